"""AffineCoupling: affine coupling with a bounded log-scale, conditioner evaluated once.

Dinh, Sohl-Dickstein, Bengio. Density estimation using Real NVP. ICLR 2017.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tf_denseflow.bijectors.flow_bijector import FlowBijector, sum_event
from tf_denseflow.checks import check_int
from tf_denseflow.shapes import concat_shape, shape_of

__all__ = ['AffineCoupling']


class AffineCoupling(FlowBijector):
  """Affine coupling on `[H, W, C]`: the first `ceil(C/2)` channels condition the rest.

  ```
  (s, t) = conditioner(x1 [, context]);  log_scale = 2 * tanh(s / 2)
  inverse (density):   z2 = t + exp(log_scale) * x2          log-det  sum(log_scale)
  forward (sampling):  x2 = (z2 - t) * exp(-log_scale)       log-det -sum(log_scale)
  ```
  The conditioner is a Keras layer mapping `[N, H, W, ceil(C/2) (+ context)]` to
  `[N, H, W, 2*floor(C/2)]` with interleaved outputs (channel `2k` is `s_k`, `2k+1` is `t_k`, the
  official 'sequential' layout). Keyword arguments: `training` (batch-norm mode, default False)
  and `context` (extra conditioner input, concatenated after x1). `forward_min_event_ndims=3`.

  Variables: those of `conditioner` (a Keras layer; `DenseFlow.trainable_variables` collects them).

  #### References
  [1]: Laurent Dinh, Jascha Sohl-Dickstein, Samy Bengio. Density estimation using Real NVP. In
       _International Conference on Learning Representations_, 2017.
  """

  def __init__(
    self,
    channels: int,
    conditioner,
    use_recompute_grad: bool = False,
    validate_args: bool = False,
    name: str = 'affine_coupling',
  ):
    parameters = dict(locals())
    channels = check_int('channels', channels, minimum=2)
    with tf.name_scope(name) as name:
      self._channels = int(channels)
      self._num_masked = (self._channels + 1) // 2
      self.conditioner = conditioner
      self._use_recompute_grad = use_recompute_grad
      super().__init__(validate_args=validate_args, parameters=parameters, name=name)

  @property
  def channels(self) -> int:
    """Number of channels C."""
    return self._channels

  def _split(self, x):
    # Split, not two slices: the gradient is one concat, not two StridedSliceGrads and an add.
    return tf.split(x, [self._num_masked, self._channels - self._num_masked], axis=-1)

  def _run_conditioner(self, h, training):
    if self._use_recompute_grad and training:
      return tf.recompute_grad(lambda v: self.conditioner(v, training=True))(h)
    return self.conditioner(h, training=training)

  def _shift_and_log_scale(self, x1, context: Optional[tf.Tensor], training: bool):
    h = x1
    batch = shape_of(x1)[:-3]
    height, width = x1.shape[-3], x1.shape[-2]
    h = tf.reshape(h, [-1, height, width, self._num_masked])
    if context is not None:
      context = tf.reshape(context, [-1, height, width, context.shape[-1]])
      h = tf.concat([h, tf.cast(context, h.dtype)], axis=-1)
    params = tf.cast(self._run_conditioner(h, training), x1.dtype)
    params = tf.reshape(
      params, concat_shape(batch, [height, width, self._channels - self._num_masked, 2])
    )
    s, shift = tf.unstack(params, 2, axis=-1)  # Unpack: its gradient is one Pack
    return shift, 2.0 * tf.tanh(s / 2.0)

  def forward_and_log_det(self, z, context=None, training=False, **kwargs):
    z1, z2 = self._split(z)
    shift, log_scale = self._shift_and_log_scale(z1, context, training)
    x2 = (z2 - shift) * tf.exp(-log_scale)
    return tf.concat([z1, x2], axis=-1), -sum_event(log_scale)

  def inverse_and_log_det(self, x, context=None, training=False, **kwargs):
    x1, x2 = self._split(x)
    shift, log_scale = self._shift_and_log_scale(x1, context, training)
    z2 = shift + tf.exp(log_scale) * x2
    return tf.concat([x1, z2], axis=-1), sum_event(log_scale)
