"""Dequantization: uniform, and the official variational (conditional-flow) dequantization.

Ho et al. Flow++: improving flow-based generative models with variational dequantization and
architecture design. ICML 2019.

Dequantization is stochastic, not a bijection: it draws `u ~ q(u|x)` in `[0, 1)^D` and declares
its lower-bound term. For uint8 images x and `y = (x + u) / 2**num_bits`:
```
log P(x) >= E_{u ~ q}[ log p(y) - D * log(2**num_bits) - log q(u|x) ]
```
"""

from __future__ import annotations

from typing import Optional, Tuple

import tensorflow as tf

from tf_denseflow.bijectors.affine_coupling import AffineCoupling
from tf_denseflow.bijectors.conv1x1 import InvertibleConv1x1
from tf_denseflow.bijectors.flow_bijector import std_normal_log_prob, sum_event
from tf_denseflow.bijectors.squeeze import unsqueeze2x2
from tf_denseflow.nn.coupling_net import ContextNetwork, DequantCouplingNetwork
from tf_denseflow.nn.layers import Seeds
from tf_denseflow.shapes import shape_of

__all__ = ['UniformDequantization', 'VariationalDequantization', 'make_dequantizer']


class UniformDequantization(tf.Module):
  """`u ~ U(0, 1)^D`, `log q(u|x) = 0`."""

  def __init__(self, image_shape, name: str = 'uniform_dequantization'):
    super().__init__(name=name)
    self.image_shape = tuple(image_shape)

  @property
  def noise_shape(self) -> Tuple[int, int, int]:
    """Event shape of the noise this dequantizer draws."""
    return self.image_shape

  def draw_noise(self, shape, seed) -> tf.Tensor:
    """`u ~ U(0, 1)` of `shape` (`[B, *noise_shape]`) from a stateless seed."""
    return tf.random.stateless_uniform(shape, seed=seed)

  def sample_and_log_prob(
    self, images: tf.Tensor, seed=None, noise: Optional[tf.Tensor] = None, training=False
  ):
    """Returns `(u, log q(u|x))`; `noise` (in `[0,1)`, image-shaped) replaces the draw."""
    del training
    if noise is None:
      noise = self.draw_noise(tf.shape(images), seed)
    return noise, tf.zeros(shape_of(images)[:-3])


class VariationalDequantization(tf.Module):
  """The official variational dequantization: a conditional flow from N(loc, scale) to (0,1)^D.

  ```
  ctx = ContextNetwork(x)                                     # [H/2, W/2, context]
  e_0 = loc + exp(log_scale) * eps,  eps ~ N(0, I)            # [H/2, W/2, 4C]
  e   = [conv1x1 -> coupling(ctx)] x num_steps -> conv1x1 -> unsqueeze -> sigmoid  = u
  log q(u|x) = log N(e_0; loc, scale) - sum of the log-dets (density direction of each step)
  ```
  Each step is one of this package's bijectors applied in its density direction
  (`inverse_and_log_det`), as the official code applies its transforms' forward maps.

  Variables: `loc`, `log_scale` `[4C]`, the 1x1 conv kernels, the coupling and context networks.
  `compute_dtype` is the context and coupling networks' (`DenseFlowConfig.coupling_dtype`, the
  training flag `--precision`); their outputs, the affine maps and the log-densities are float32.
  """

  def __init__(
    self,
    image_shape,
    num_steps: int = 4,
    context_channels: int = 64,
    mid_channels: int = 64,
    depth: int = 4,
    growth: int = 64,
    context_depth: int = 4,
    context_growth: int = 16,
    squeeze_order: str = 'channel_major',
    seeds: Optional[Seeds] = None,
    name: str = 'variational_dequantization',
    num_bits: int = 8,
    compute_dtype: str = 'float32',
  ):
    super().__init__(name=name)
    seeds = seeds or Seeds()
    h, w, c = image_shape
    self.image_shape = (int(h), int(w), int(c))
    self._squeeze_order = squeeze_order
    channels = 4 * c
    self._channels = channels
    with self.name_scope:
      self.context_net = ContextNetwork(
        c,
        context_channels,
        context_depth,
        context_growth,
        seeds,
        num_bits=num_bits,
        compute_dtype=compute_dtype,
      )
      self.loc = tf.Variable(tf.zeros([channels]), name='loc')
      self.log_scale = tf.Variable(tf.zeros([channels]), name='log_scale')
      self.convs = [InvertibleConv1x1(channels, seed=seeds()) for _ in range(num_steps + 1)]
      half = (channels + 1) // 2
      self.couplings = [
        AffineCoupling(
          channels,
          DequantCouplingNetwork(
            half + context_channels,
            2 * (channels - half),
            mid_channels,
            depth,
            growth,
            seeds,
            compute_dtype=compute_dtype,
          ),
          name=f'dequant_coupling_{k}',
        )
        for k in range(num_steps)
      ]

  @property
  def noise_shape(self) -> Tuple[int, int, int]:
    """Event shape of the Gaussian noise eps this dequantizer draws, `[H/2, W/2, 4C]`."""
    h, w, _ = self.image_shape
    return (h // 2, w // 2, self._channels)

  def draw_noise(self, shape, seed) -> tf.Tensor:
    """`eps ~ N(0, I)` of `shape` (`[B, *noise_shape]`) from a stateless seed."""
    return tf.random.stateless_normal(shape, seed=seed)

  def sample_and_log_prob(
    self, images: tf.Tensor, seed=None, noise: Optional[tf.Tensor] = None, training=False
  ):
    """Returns `(u, log q(u|x))` for `images [B, H, W, C]`.

    Args:
      images: the model's integer levels `0..2**num_bits - 1` (float32 or integer dtype).
      seed: stateless seed `[2]` for the Gaussian noise (ignored when `noise` is given).
      noise: optional `[B, H/2, W/2, 4C]` standard-normal draw to use instead (parity replay).
      training: batch-norm mode (unused: this flow has no batch norm).

    Returns:
      `u` in `(0, 1)`, image-shaped float32, and `log q(u|x)` `[B]` in nats.
    """
    del training
    context = self.context_net(images)
    if noise is None:
      noise = self.draw_noise(tf.concat([tf.shape(images)[:1], self.noise_shape], 0), seed)
    hw = float(self.noise_shape[0] * self.noise_shape[1])
    e = self.loc + tf.exp(self.log_scale) * noise
    log_q = std_normal_log_prob(noise) - hw * tf.reduce_sum(self.log_scale)
    for k, coupling in enumerate(self.couplings):
      e, ld = self.convs[k].inverse_and_log_det(e)
      log_q -= ld
      e, ld = coupling.inverse_and_log_det(e, context=context)
      log_q -= ld
    e, ld = self.convs[-1].inverse_and_log_det(e)
    log_q -= ld
    e = unsqueeze2x2(e, self._squeeze_order)
    u = tf.sigmoid(e)
    log_q -= sum_event(-tf.nn.softplus(-e) - tf.nn.softplus(e))
    return u, log_q


def make_dequantizer(config, seeds: Optional[Seeds] = None):
  """The dequantizer a `DenseFlowConfig` asks for (`config.dequantization`)."""
  if config.dequantization == 'uniform':
    return UniformDequantization(config.image_shape)
  return VariationalDequantization(
    config.image_shape,
    num_steps=config.dequant_steps,
    context_channels=config.dequant_context_channels,
    mid_channels=config.dequant_mid_channels,
    depth=config.dequant_depth,
    growth=config.dequant_growth,
    context_depth=config.dequant_context_depth,
    context_growth=config.dequant_context_growth,
    squeeze_order=config.squeeze_order,
    seeds=seeds,
    num_bits=config.num_bits,
    compute_dtype=config.coupling_dtype,
  )
