"""InvertibleConv1x1: a learned channel-mixing matrix (invertible 1x1 convolution).

Kingma, Dhariwal. Glow: generative flow with invertible 1x1 convolutions. NeurIPS 2018.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tf_denseflow import kernels, shapes, xla
from tf_denseflow.bijectors.flow_bijector import FlowBijector
from tf_denseflow.checks import check_int

__all__ = ['InvertibleConv1x1', 'log_abs_det', 'random_orthogonal']


def random_orthogonal(channels: int, seed) -> tf.Tensor:
  """A random orthogonal `[C, C]` matrix (QR of a Gaussian matrix, signs fixed)."""
  a = tf.random.stateless_normal([channels, channels], seed=seed, dtype=tf.float64)
  q, r = tf.linalg.qr(a)
  q = q * tf.sign(tf.linalg.diag_part(r))[None, :]
  return tf.cast(q, tf.float32)


def log_abs_det(matrix: tf.Tensor) -> tf.Tensor:
  """`log|det W|`: `tf.linalg.slogdet`, or `sum(log|diag R|)` of `W = QR` under XLA.

  XLA has no kernel for slogdet and has one for QR, so code traced under `xla.compatible()` (the
  train step's and bench's `jit_compile` functions, through `xla.jit`) uses QR. Outside XLA
  slogdet (LU) is ~3.5x faster with its gradient (`W^-T`) on this model's 62..308 channels.
  """
  if xla.compatible_now():
    r = tf.linalg.qr(matrix, full_matrices=False)[1]
    return tf.reduce_sum(tf.math.log(tf.abs(tf.linalg.diag_part(r))))
  return tf.linalg.slogdet(matrix)[1]


class InvertibleConv1x1(FlowBijector):
  """A full `[C, C]` matrix W applied to every pixel (no LU parametrisation, as official).

  ```
  inverse (density):   z = x @ W^T                  log-det  H*W*log|det W|
  forward (sampling):  x = z @ W^-T                 log-det -H*W*log|det W|
  ```
  i.e. `z[..., o] = sum_i W[o, i] x[..., i]` (PyTorch's `F.conv2d(x, W[:, :, None, None])`).
  W is initialised to a random orthogonal matrix. `forward_min_event_ndims=3`; any float dtype
  (W is cast to it). The product is a matmul or `tf.nn.conv2d`, as `tf_denseflow.kernels` says.

  Variables: `kernel` `[C, C]` (trainable).

  #### References
  [1]: Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with Invertible 1x1
       Convolutions. In _Neural Information Processing Systems_, 2018.
  """

  def __init__(
    self,
    channels: int,
    seed: Optional[tf.Tensor] = None,
    validate_args: bool = False,
    name: str = 'invertible_conv1x1',
  ):
    parameters = dict(locals())
    channels = check_int('channels', channels, minimum=1)
    with tf.name_scope(name) as name:
      self._channels = int(channels)
      seed = tf.constant([0, 0], tf.int32) if seed is None else seed
      self.kernel = tf.Variable(random_orthogonal(self._channels, seed), name='kernel')
      super().__init__(
        is_constant_jacobian=True, validate_args=validate_args, parameters=parameters, name=name
      )

  @property
  def channels(self) -> int:
    """Number of channels C."""
    return self._channels

  def _apply(self, x, matrix):
    """`x @ matrix^T` on the channel axis (`kernels.resolve()` picks matmul or conv2d)."""
    if kernels.resolve() == 'cpu':
      flat = tf.reshape(x, [-1, self._channels])
      return tf.reshape(tf.matmul(flat, matrix, transpose_b=True), shapes.shape_of(x))
    # Any batch shape (`[]`, `[B]`, `[B1, B2]`) as one `[N, H, W, C]` batch for the library op.
    images = tf.reshape(x, shapes.concat_shape([-1], shapes.shape_of(x)[-3:]))
    kernel = tf.transpose(matrix)[None, None]  # [1, 1, C_in, C_out]
    return tf.reshape(tf.nn.conv2d(images, kernel, 1, 'VALID'), shapes.shape_of(x))

  def _log_det(self, x, kernel):
    shape = shapes.shape_of(x)
    hw = shapes.cast(shape[-3] * shape[-2], x.dtype)
    return hw * log_abs_det(kernel) * tf.ones(shape[:-3], x.dtype)

  def forward_and_log_det(self, z, **kwargs):
    kernel = tf.cast(self.kernel, z.dtype)
    return self._apply(z, tf.linalg.inv(kernel)), -self._log_det(z, kernel)

  def inverse_and_log_det(self, x, **kwargs):
    kernel = tf.cast(self.kernel, x.dtype)
    return self._apply(x, kernel), self._log_det(x, kernel)
