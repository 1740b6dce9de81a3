"""Transition: squeeze, then factor out half of the channels (multi-scale architecture).

Dinh, Sohl-Dickstein, Bengio. Density estimation using Real NVP. ICLR 2017.
"""

from __future__ import annotations

import tensorflow as tf

from tf_denseflow.bijectors.flow_bijector import FlowBijector
from tf_denseflow.bijectors.squeeze import squeeze2x2, unsqueeze2x2
from tf_denseflow.shapes import shape_of

__all__ = ['Transition']


class Transition(FlowBijector):
  """`x [H, W, C]` <-> `[z_keep [H/2, W/2, 2C], z_out [H/2, W/2, 2C]]`.

  ```
  inverse (density):   [z_keep, z_out] = split(squeeze2x2(x))     # keep the first half
  forward (sampling):  x = unsqueeze2x2(concat[z_keep, z_out])
  ```
  Volume preserving. DenseFlow scores `z_out` under a fixed N(0, I) (not a learned or
  conditional prior), so it is a latent of the model's base distribution. `forward_min_event_ndims
  = [3, 3]`, `inverse_min_event_ndims=3`; no variables.
  """

  def __init__(
    self, order: str = 'channel_major', validate_args: bool = False, name: str = 'transition'
  ):
    parameters = dict(locals())
    if order not in ('channel_major', 'space_to_depth'):
      raise ValueError(f"`order` must be 'channel_major' or 'space_to_depth', got {order!r}.")
    with tf.name_scope(name) as name:
      self._order = order
      super().__init__(
        forward_min_event_ndims=[3, 3],
        inverse_min_event_ndims=3,
        is_constant_jacobian=True,
        validate_args=validate_args,
        parameters=parameters,
        name=name,
      )

  def forward_and_log_det(self, parts, **kwargs):
    z_keep, z_out = parts
    x = unsqueeze2x2(tf.concat([z_keep, z_out], axis=-1), self._order)
    return x, tf.zeros(shape_of(z_keep)[:-3], z_keep.dtype)

  def inverse_and_log_det(self, x, **kwargs):
    z = squeeze2x2(x, self._order)
    half = z.shape[-1] // 2
    return tf.split(z, [half, z.shape[-1] - half], axis=-1), tf.zeros(shape_of(x)[:-3], x.dtype)

  def _forward_dtype(self, dtypes, **kwargs):
    return dtypes[0]

  def _inverse_dtype(self, dtype, **kwargs):
    return [dtype, dtype]

  def _forward_event_shape(self, s):
    h, w, c = tf.TensorShape(s[0])[-3:]
    return tf.TensorShape([h * 2, w * 2, c // 2])

  def _inverse_event_shape(self, s):
    h, w, c = tf.TensorShape(s)[-3:]
    half = tf.TensorShape([h // 2, w // 2, c * 2])
    return [half, half]

  def _forward_event_shape_tensor(self, s):
    return tf.stack([s[0][-3] * 2, s[0][-2] * 2, s[0][-1] // 2])

  def _inverse_event_shape_tensor(self, s):
    half = tf.stack([s[-3] // 2, s[-2] // 2, s[-1] * 2])
    return [half, half]
