"""ChannelSwap: exchanges the two channel halves (so successive couplings alternate halves)."""

from __future__ import annotations

import tensorflow as tf

from tf_denseflow.bijectors.flow_bijector import FlowBijector
from tf_denseflow.checks import check_int
from tf_denseflow.shapes import shape_of

__all__ = ['ChannelSwap']


class ChannelSwap(FlowBijector):
  """Swap of channel halves, as the official `SwitchChannels`.

  ```
  inverse (density):   [a, b] -> [b, a]     a = first ceil(C/2) channels
  forward (sampling):  [b, a] -> [a, b]
  ```
  Volume preserving. `forward_min_event_ndims=3`; no variables.
  """

  def __init__(self, channels: int, validate_args: bool = False, name: str = 'channel_swap'):
    parameters = dict(locals())
    channels = check_int('channels', channels, minimum=1)
    with tf.name_scope(name) as name:
      self._channels = int(channels)
      super().__init__(
        is_constant_jacobian=True, validate_args=validate_args, parameters=parameters, name=name
      )

  @property
  def channels(self) -> int:
    """Number of channels C."""
    return self._channels

  def forward_and_log_det(self, z, **kwargs):
    k = self._channels // 2  # z = [b, a] with b the last floor(C/2) channels of x
    head, tail = tf.split(z, [k, self._channels - k], axis=-1)
    return tf.concat([tail, head], axis=-1), tf.zeros(shape_of(z)[:-3], z.dtype)

  def inverse_and_log_det(self, x, **kwargs):
    k = (self._channels + 1) // 2
    head, tail = tf.split(x, [k, self._channels - k], axis=-1)
    return tf.concat([tail, head], axis=-1), tf.zeros(shape_of(x)[:-3], x.dtype)
