"""Custom gradients that do not keep the graphs they were traced in alive.

`tf.custom_gradient` in a graph registers a new gradient function in TensorFlow's process-wide
gradient registry on every call, and never removes it; that function closes over the call's
forward tensors, so every graph that ever traced a custom gradient stays in memory for the rest
of the process (the whole traced training step: `small` holds ~85 MB of traced graph, and a
process that traces again, a test suite, an evaluation at another batch size, keeps every
copy). A `GradientRule` registers its gradient once, under a fixed name, and computes it from
the gradient op's inputs, so no registry entry refers to a graph:

```
y = rule(*inputs)        # forward(*inputs) -> y, one tensor
# gradient: backward(inputs, dy) -> one gradient (or None) per input
```

Same structure as `tf.custom_gradient` (the behaviour BUILD.md relies on): in a graph, `y` is
the first output of one `IdentityN` over `[forward(*inputs), *inputs]` whose gradient is the
rule's (`_gradient_op_type`), which the symbolic gradients of a function (`tf.gradients`, the
forward/backward pair of a shared network function) use; a recording gradient tape gets the
same gradient through a record of its own (which lives as long as the tape). The forward ops
are not recorded on a tape, so an eager tape keeps only the inputs. Inputs must be tensors of a
floating dtype (variables are read first, outside the rule).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import tensorflow as tf
from tensorflow.python.eager import record  # private (BUILD.md): stop_recording, record_operation

__all__ = ['GradientRule']

Backward = Callable[[Tuple[tf.Tensor, ...], tf.Tensor], Sequence[Optional[tf.Tensor]]]


class GradientRule:
  """`forward` with the gradient `backward`, registered once (module docstring).

  Args:
    name: unique in the process; the registered gradient's name is `TfDenseflow<name>`.
    forward: `(*inputs) -> y`, one tensor.
    backward: `(inputs, dy) -> [gradient or None per input]`; it must compute from its
      arguments only (it runs in whatever graph the gradient is built in).

  Raises:
    KeyError: at construction, `name` is registered already.
  """

  def __init__(self, name: str, forward: Callable[..., tf.Tensor], backward: Backward):
    self.name = f'TfDenseflow{name}'
    self._forward = forward
    self._backward = backward
    tf.RegisterGradient(self.name)(self._graph_gradient)

  def _gradients(self, inputs: Tuple[tf.Tensor, ...], dy: tf.Tensor) -> list:
    grads = list(self._backward(inputs, dy))
    if len(grads) != len(inputs):
      raise ValueError(f'{self.name}: {len(grads)} gradients for {len(inputs)} inputs.')
    return grads

  def _graph_gradient(self, op, dy, *unused_input_grads):
    return [None] + self._gradients(tuple(op.inputs[1:]), dy)

  def __call__(self, *inputs: tf.Tensor) -> tf.Tensor:
    inputs = tuple(tf.convert_to_tensor(x) for x in inputs)
    with record.stop_recording():
      y = self._forward(*inputs)
      if not tf.executing_eagerly():
        with tf.compat.v1.get_default_graph().gradient_override_map({'IdentityN': self.name}):
          y = tf.identity_n([y, *inputs])[0]
    record.record_operation(self.name, [y], list(inputs), lambda dy: self._gradients(inputs, dy))
    return y
