"""Rebuilding a 1x1 convolution's input in the backward pass instead of keeping it.

The input of dense layer j (and of the gate) of a `DenseConvBlock` is `concat[x, g_1, .., g_j]`,
`C + j * growth` channels per pixel. The backward pass keeps `x` and every `g_i` anyway (the
first 1x1 conv's and each ReLU's gradient), so keeping every concatenation too costs memory
quadratic in the depth for nothing: at `small`, batch 16, 233 of the 514 MB of forward tensors
that the gradient reads (docs/benchmarks.md, section 4). `matmul_of_concatenation` makes a
matmul of a concatenation whose weight gradient rebuilds it from the pieces once the upstream
gradient exists; one concat per layer in the backward pass, the same gradients. It is the path of
`Conv`'s CPU kernels (1x1 convolutions as matmuls); the 'library' kernels (`tf.nn.conv2d`, cuDNN
on a GPU) keep the concatenation, and under `--jit_compile` XLA may merge the rebuilt
concatenation with the forward one (it does not keep control dependencies).

Whether to take that path is decided when the ops are created: only where a gradient may be
taken (`gradient_expected()`: a tape could record now). A shared network function
(`nn.shared_function`) is traced in a graph of its own, so its caller decides, passes the answer
in the function's trace key, and the body is traced under `expecting_gradient(answer)`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence, Tuple

import tensorflow as tf
from tensorflow.python.eager import record  # private (BUILD.md): could_possibly_record

from tf_denseflow.nn import gradient_rules

__all__ = [
  'ENABLED',
  'FlatPieces',
  'expecting_gradient',
  'gradient_expected',
  'matmul_of_concatenation',
  'rebuilding',
]

# Process-wide: False makes `gradient_expected()` False everywhere (the dense blocks then keep
# their concatenations, as before; benchmarks/memory_phases.py --keep_concatenations). Read when
# ops are created, in every thread (MirroredStrategy traces each replica in a thread of its own).
ENABLED = True

_STATE = threading.local()


@contextlib.contextmanager
def rebuilding(enabled: bool) -> Iterator[None]:
  """Within the block, `ENABLED` is `enabled` (as `shared_function.sharing` for its switch)."""
  global ENABLED
  previous, ENABLED = ENABLED, bool(enabled)
  try:
    yield
  finally:
    ENABLED = previous


def gradient_expected() -> bool:
  """Whether ops created now may be differentiated (a gradient tape could record them).

  False while `ENABLED` is False.
  """
  if not ENABLED:
    return False
  forced = getattr(_STATE, 'forced', None)
  # No public equivalent of TF's own check (BUILD.md, private APIs).
  return bool(record.could_possibly_record()) if forced is None else forced


@contextlib.contextmanager
def expecting_gradient(value: bool) -> Iterator[None]:
  """Within the block, `gradient_expected()` is `value` (a shared function's traced body)."""
  previous = getattr(_STATE, 'forced', None)
  _STATE.forced = bool(value)
  try:
    yield
  finally:
    _STATE.forced = previous


class FlatPieces:
  """Each piece of a dense block cast and reshaped to `[N*H*W, C_i]` once, for every layer.

  A plain object, not a dict: Keras rebuilds the nested structures it is called with.
  """

  def __init__(self) -> None:
    self._flat = {}

  def __call__(self, piece: tf.Tensor, channels: int, dtype: tf.DType) -> tf.Tensor:
    """`piece` `[..., channels]` as a `[N*H*W, channels]` tensor of `dtype` (made once)."""
    key = (piece.ref(), dtype)
    if key not in self._flat:
      self._flat[key] = tf.reshape(tf.cast(piece, dtype), [-1, channels])
    return self._flat[key]


def _concat_matmul_forward(b: tf.Tensor, *pieces: tf.Tensor) -> tf.Tensor:
  return tf.matmul(tf.concat(pieces, axis=1), b)


def _concat_matmul_backward(inputs: Tuple[tf.Tensor, ...], dy: tf.Tensor):
  b, pieces = inputs[0], inputs[1:]
  sizes = [p.shape[1] if p.shape[1] is not None else tf.shape(p)[1] for p in pieces]
  # As TF's own MatMul and ConcatV2 gradients: the same kernels with the same attributes.
  grad_a = tf.raw_ops.MatMul(a=dy, b=b, transpose_b=True, grad_a=True)
  with tf.control_dependencies([dy]):
    a = tf.concat(pieces, axis=1)
  grad_b = tf.raw_ops.MatMul(a=a, b=dy, transpose_a=True, grad_b=True)
  return (grad_b, *tf.split(grad_a, sizes, axis=1))


_CONCAT_MATMUL = gradient_rules.GradientRule(
  'MatmulOfConcatenation', _concat_matmul_forward, _concat_matmul_backward
)


def matmul_of_concatenation(pieces: Sequence[tf.Tensor], b: tf.Tensor) -> tf.Tensor:
  """`concat(pieces, axis=1) @ b`, the concatenation not kept for the gradient.

  Shapes: pieces `[M, K_i]`, `b` `[sum K_i, N]`, the result `[M, N]`.

  The gradient rebuilds the concatenation for `b`'s gradient once the upstream gradient exists
  (a control dependency, so the executor cannot build it early and hold it); the pieces are
  kept (they are the custom gradient's inputs). The concatenation is made inside the custom
  gradient's forward (not recorded on a tape): were it an input, the gradient of a shared network
  function (whose forward function returns every tensor its backward reads, zeros for unused
  gradients included) would keep it. The gradients are the MatMul kernel's and ConcatV2's, of
  the same values, bit for bit. The custom gradient is a `nn.gradient_rules.GradientRule` (no
  traced graph kept alive). Without `gradient_expected()` it is a plain concat and matmul.
  """
  pieces = list(pieces)
  if len(pieces) == 1 or not gradient_expected():
    return tf.matmul(tf.concat(pieces, axis=1) if len(pieces) > 1 else pieces[0], b)
  return _CONCAT_MATMUL(b, *pieces)
