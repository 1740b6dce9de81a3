"""Squeeze: 2x2 space-to-depth, in the official channel-major order or TF's order.

Dinh, Sohl-Dickstein, Bengio. Density estimation using Real NVP. ICLR 2017.
"""

from __future__ import annotations

import tensorflow as tf

from tf_denseflow.bijectors.flow_bijector import FlowBijector
from tf_denseflow.config import SQUEEZE_ORDERS
from tf_denseflow.shapes import concat_shape, shape_of

__all__ = ['Squeeze', 'squeeze2x2', 'unsqueeze2x2']


def squeeze2x2(x: tf.Tensor, order: str = 'channel_major') -> tf.Tensor:
  """`[..., H, W, C] -> [..., H/2, W/2, 4C]`.

  'channel_major' (official): output channel `c*4 + i*2 + j` holds `x[2h+i, 2w+j, c]`.
  'space_to_depth' (TF): output channel `(i*2 + j)*C + c`.
  """
  h, w, c = x.shape[-3], x.shape[-2], x.shape[-1]
  batch = shape_of(x)[:-3]
  y = tf.reshape(x, [-1, h // 2, 2, w // 2, 2, c])
  perm = [0, 1, 3, 5, 2, 4] if order == 'channel_major' else [0, 1, 3, 2, 4, 5]
  y = tf.transpose(y, perm)
  return tf.reshape(y, concat_shape(batch, [h // 2, w // 2, 4 * c]))


def unsqueeze2x2(y: tf.Tensor, order: str = 'channel_major') -> tf.Tensor:
  """Inverse of `squeeze2x2`: `[..., H, W, 4C] -> [..., 2H, 2W, C]`."""
  h, w, c4 = y.shape[-3], y.shape[-2], y.shape[-1]
  c = c4 // 4
  batch = shape_of(y)[:-3]
  if order == 'channel_major':
    x = tf.reshape(y, [-1, h, w, c, 2, 2])
    x = tf.transpose(x, [0, 1, 4, 2, 5, 3])
  else:
    x = tf.reshape(y, [-1, h, w, 2, 2, c])
    x = tf.transpose(x, [0, 1, 3, 2, 4, 5])
  return tf.reshape(x, concat_shape(batch, [2 * h, 2 * w, c]))


class Squeeze(FlowBijector):
  """2x2 squeeze between `[H, W, C]` (data side) and `[H/2, W/2, 4C]` (latent side).

  ```
  inverse (density):   z = squeeze2x2(x)      [H, W, C] -> [H/2, W/2, 4C]
  forward (sampling):  x = unsqueeze2x2(z)    [H/2, W/2, 4C] -> [H, W, C]
  ```
  Volume preserving (log-det 0). `order='channel_major'` is the official order; `'space_to_depth'`
  matches `tf.nn.space_to_depth`. `forward_min_event_ndims=3`; no variables.
  """

  def __init__(
    self, order: str = 'channel_major', validate_args: bool = False, name: str = 'squeeze'
  ):
    parameters = dict(locals())
    if order not in SQUEEZE_ORDERS:
      raise ValueError(f'`order` must be one of {SQUEEZE_ORDERS}, got {order!r}.')
    with tf.name_scope(name) as name:
      self._order = order
      super().__init__(
        is_constant_jacobian=True, validate_args=validate_args, parameters=parameters, name=name
      )

  @property
  def order(self) -> str:
    """The channel order, 'channel_major' or 'space_to_depth'."""
    return self._order

  def forward_and_log_det(self, z, **kwargs):
    return unsqueeze2x2(z, self._order), tf.zeros(shape_of(z)[:-3], z.dtype)

  def inverse_and_log_det(self, x, **kwargs):
    return squeeze2x2(x, self._order), tf.zeros(shape_of(x)[:-3], x.dtype)

  def _forward_event_shape(self, s):
    return tf.TensorShape(
      [None if d is None else d * 2 for d in s[-3:-1]] + [None if s[-1] is None else s[-1] // 4]
    )

  def _inverse_event_shape(self, s):
    return tf.TensorShape(
      [None if d is None else d // 2 for d in s[-3:-1]] + [None if s[-1] is None else s[-1] * 4]
    )

  def _forward_event_shape_tensor(self, s):
    return tf.stack([s[-3] * 2, s[-2] * 2, s[-1] // 4])

  def _inverse_event_shape_tensor(self, s):
    return tf.stack([s[-3] // 2, s[-2] // 2, s[-1] * 4])
