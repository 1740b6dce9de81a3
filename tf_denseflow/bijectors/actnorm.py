"""ActNorm: per-channel affine map with data-dependent initialisation.

Kingma, Dhariwal. Glow: generative flow with invertible 1x1 convolutions. NeurIPS 2018.
"""

from __future__ import annotations

import tensorflow as tf

from tf_denseflow import shapes
from tf_denseflow.bijectors.flow_bijector import FlowBijector
from tf_denseflow.checks import check_int

__all__ = ['ActNorm']


class ActNorm(FlowBijector):
  """Per-channel shift and log-scale on `[..., H, W, C]` events.

  ```
  forward (sampling):  x = z * exp(log_scale) + shift          log-det  H*W*sum(log_scale)
  inverse (density):   z = (x - shift) * exp(-log_scale)       log-det -H*W*sum(log_scale)
  ```
  `initialize(x)` sets `shift = mean(x)` and `log_scale = log(std(x) + 1e-6)` per channel over
  batch and space (unbiased std, as the official code), so that the density direction maps that
  batch to zero mean and unit variance. It is explicit: call it once, in cross-replica context,
  before training (`DenseFlow.initialize` does). `forward_min_event_ndims=3`.

  Variables: `shift` `[C]`, `log_scale` `[C]` (trainable), `initialized` (bool, checkpointed).

  #### References
  [1]: Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with Invertible 1x1
       Convolutions. In _Neural Information Processing Systems_, 2018.
  """

  def __init__(self, channels: int, validate_args: bool = False, name: str = 'act_norm'):
    parameters = dict(locals())
    channels = check_int('channels', channels, minimum=1)
    with tf.name_scope(name) as name:
      self._channels = int(channels)
      self.shift = tf.Variable(tf.zeros([channels]), name='shift')
      self.log_scale = tf.Variable(tf.zeros([channels]), name='log_scale')
      self.initialized = tf.Variable(False, trainable=False, name='initialized')
      super().__init__(
        is_constant_jacobian=True, validate_args=validate_args, parameters=parameters, name=name
      )

  @property
  def channels(self) -> int:
    """Number of channels C."""
    return self._channels

  def initialize(self, x: tf.Tensor) -> None:
    """Data-dependent init from a `[B, H, W, C]` batch in this bijector's data space."""
    x = tf.cast(x, tf.float32)
    mean = tf.reduce_mean(x, axis=[0, 1, 2])
    n = shapes.cast(shapes.num_elements(shapes.shape_of(x)[:-1]), tf.float32)
    var = tf.reduce_sum(tf.square(x - mean), axis=[0, 1, 2]) / tf.maximum(n - 1.0, 1.0)
    self.shift.assign(mean)
    self.log_scale.assign(tf.math.log(tf.sqrt(var) + 1e-6))
    self.initialized.assign(True)

  def _params(self, x):
    return tf.cast(self.shift, x.dtype), tf.cast(self.log_scale, x.dtype)

  def _log_det(self, x, log_scale):
    shape = shapes.shape_of(x)
    hw = shapes.cast(shape[-3] * shape[-2], x.dtype)
    return hw * tf.reduce_sum(log_scale) * tf.ones(shape[:-3], x.dtype)

  def forward_and_log_det(self, z, **kwargs):
    shift, log_scale = self._params(z)
    return z * tf.exp(log_scale) + shift, self._log_det(z, log_scale)

  def inverse_and_log_det(self, x, **kwargs):
    shift, log_scale = self._params(x)
    return (x - shift) * tf.exp(-log_scale), -self._log_det(x, log_scale)
