"""Custom gradients that do not keep the graphs they were traced in alive.

`tf.custom_gradient` in a graph registers a new gradient function in TensorFlow's process-wide
gradient registry on every call, and never removes it; that function closes over the call's
forward tensors, so every graph that ever traced a custom gradient stays in memory for the rest
of the process (a dropped `small` training step: ~85 MB of graph; a process that traces again,
a test suite, an evaluation or sample grid per call, kept every copy; BUILD.md, "Known TF
bugs"). A `GradientRule` computes its gradient from the gradient op's inputs and registers, per
call, a function that holds the call's tensors only through weak references (a few hundred
bytes in the registry per call, no graph):

```
y = rule(*inputs)        # forward(*inputs) -> y, one new tensor
# gradient: backward(inputs, dy) -> one gradient (or None) per input
```

Same structure as `tf.custom_gradient` (the behaviour BUILD.md relies on): in a graph, `y` is
the first output of one `IdentityN` over `[forward(*inputs), *inputs]` whose gradient is the
call's registered one (`_gradient_op_type`, a name of its own per call as `tf.custom_gradient`
makes, so that `tf.saved_model.save` saves one gradient per call), which symbolic gradients
(`tf.gradients`, the forward/backward pair of a function) use; a recording gradient tape or
forward accumulator gets the same gradient through a record of its own (which lives as long as
the tape). The forward ops are not recorded, so an eager tape keeps only the inputs and the
output. Inputs are converted to tensors first (a variable is read outside the rule, so its
gradient flows through the read); a forward that reads a variable itself is refused.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, List, Optional, Sequence, Tuple

import tensorflow as tf
from tensorflow.python.eager import record  # private (BUILD.md): tapes and their records
from tensorflow.python.framework import ops  # private (BUILD.md): uid, as tf.custom_gradient

__all__ = ['GradientRule']

Backward = Callable[[Tuple[tf.Tensor, ...], tf.Tensor], Sequence[Optional[tf.Tensor]]]


def _registered_gradient(rule: GradientRule, inputs: List[weakref.ref], op, dy, *unused):
  """The gradient registered for one call: from `op`'s inputs, or the call's own (op None).

  `tf.saved_model.save` traces each registered gradient with `op=None` (and the op's inputs as
  the upstream gradients), as it does `tf.custom_gradient`'s; the call's graph is alive then.
  `unused`: the upstream gradients of the `IdentityN`'s other outputs (aliases of the inputs).
  """
  if op is not None:
    forward_inputs = tuple(op.inputs[1:])
  else:
    forward_inputs = tuple(ref() for ref in inputs)
    if any(t is None for t in forward_inputs):
      raise ValueError(f'{rule.name}: the graph of this custom gradient no longer exists.')
  return [None] + rule.gradients(forward_inputs, dy)


class GradientRule:
  """`forward` with the gradient `backward` (module docstring).

  Args:
    name: a prefix for the registered gradients' names (`TfDenseflow<name>-<uid>`).
    forward: `(*inputs) -> y`, one tensor that is not one of the inputs, reading no variable.
    backward: `(inputs, dy) -> [gradient or None per input]`, from its arguments only (it runs
      in whatever graph the gradient is built in).
  """

  def __init__(self, name: str, forward: Callable[..., tf.Tensor], backward: Backward):
    self.name = f'TfDenseflow{name}'
    self._forward = forward
    self._backward = backward

  def gradients(self, inputs: Tuple[tf.Tensor, ...], dy: tf.Tensor) -> list:
    """`backward(inputs, dy)` as a list, one entry per input.

    Raises:
      ValueError: `backward` returned another number of gradients.
    """
    grads = list(self._backward(inputs, dy))
    if len(grads) != len(inputs):
      raise ValueError(f'{self.name}: {len(grads)} gradients for {len(inputs)} inputs.')
    return grads

  def __call__(self, *inputs: tf.Tensor) -> tf.Tensor:
    """`forward(*inputs)`, differentiated with `backward`.

    Shapes and dtypes: those of `forward`.

    Raises:
      ValueError: `forward` read a variable (its gradient would be lost; pass the variable as
        an input instead) or returned one of its inputs.
    """
    inputs = tuple(tf.convert_to_tensor(x) for x in inputs)
    with record.VariableWatcher() as watcher, record.stop_recording():
      y = self._forward(*inputs)
    if watcher.watched_variables():
      names = ', '.join(v.name for v in watcher.watched_variables())
      raise ValueError(f'{self.name}: the forward read variables ({names}); pass them as inputs.')
    if any(y is x for x in inputs):
      raise ValueError(f'{self.name}: the forward returned one of its inputs.')
    if not tf.executing_eagerly():
      name = f'{self.name}-{ops.uid()}'
      refs = [weakref.ref(x) for x in inputs]
      tf.RegisterGradient(name)(functools.partial(_registered_gradient, self, refs))
      graph = tf.compat.v1.get_default_graph()
      with record.stop_recording(), graph.gradient_override_map({'IdentityN': name}):
        y = tf.identity_n([y, *inputs])[0]
    record.record_operation(self.name, [y], list(inputs), lambda dy: self.gradients(inputs, dy))
    return y
