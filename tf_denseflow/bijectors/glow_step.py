"""GlowStep: ActNorm -> invertible 1x1 conv -> affine coupling -> channel swap.

Kingma, Dhariwal. Glow: generative flow with invertible 1x1 convolutions. NeurIPS 2018.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tf_denseflow.bijectors.actnorm import ActNorm
from tf_denseflow.bijectors.affine_coupling import AffineCoupling
from tf_denseflow.bijectors.channel_swap import ChannelSwap
from tf_denseflow.bijectors.conv1x1 import InvertibleConv1x1
from tf_denseflow.bijectors.flow_bijector import FlowBijector

__all__ = ['GlowStep']


class GlowStep(FlowBijector):
  """One of DenseFlow's 74 Glow-like modules on `[H, W, C]` events.

  ```
  inverse (density):   x -> ActNorm^-1 -> InvertibleConv1x1^-1 -> AffineCoupling^-1 -> swap
  forward (sampling):  the same bijectors' forward maps, in reverse order
  ```
  i.e. the same map as `tfb.Chain([act_norm, conv1x1, coupling, swap])`, written out so that each
  conditioner runs once per direction. Keyword arguments: `training` (coupling-network batch norm) and
  `data_init` (density direction only: initialise ActNorm from this input first).
  `forward_min_event_ndims=3`.

  Variables: ActNorm's `shift`, `log_scale`; the 1x1 conv's `kernel`; the conditioner's.
  """

  def __init__(
    self,
    channels: int,
    conditioner,
    conv_seed: Optional[tf.Tensor] = None,
    use_recompute_grad: bool = False,
    validate_args: bool = False,
    name: str = 'glow_step',
  ):
    parameters = dict(locals())
    with tf.name_scope(name) as name:
      self.act_norm = ActNorm(channels)
      self.conv1x1 = InvertibleConv1x1(channels, seed=conv_seed)
      self.coupling = AffineCoupling(channels, conditioner, use_recompute_grad=use_recompute_grad)
      self.swap = ChannelSwap(channels)
      super().__init__(validate_args=validate_args, parameters=parameters, name=name)

  @property
  def channels(self) -> int:
    """Number of channels C."""
    return self.act_norm.channels

  @property
  def density_order(self) -> list:
    """The bijectors in density (inverse) order."""
    return [self.act_norm, self.conv1x1, self.coupling, self.swap]

  def forward_and_log_det(self, z, training=False, **kwargs):
    log_det = 0.0
    for bijector in reversed(self.density_order):
      z, ld = bijector.forward_and_log_det(z, training=training)
      log_det += ld
    return z, log_det

  def inverse_and_log_det(self, x, training=False, data_init=False, **kwargs):
    if data_init:
      self.act_norm.initialize(x)
    log_det = 0.0
    for bijector in self.density_order:
      x, ld = bijector.inverse_and_log_det(x, training=training)
      log_det += ld
    return x, log_det
