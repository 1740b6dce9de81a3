"""DenseFlowBijector: the whole DenseFlow as one multipart `tfb.Bijector`.

Grcic, Grubisic, Segvic. Densely connected normalizing flows. NeurIPS 2021.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from tf_denseflow.bijectors.actnorm import ActNorm
from tf_denseflow.bijectors.cross_unit import CrossUnitCoupling
from tf_denseflow.bijectors.dense_block import DenseBlock
from tf_denseflow.bijectors.flow_bijector import FlowBijector
from tf_denseflow.bijectors.glow_step import GlowStep
from tf_denseflow.bijectors.squeeze import Squeeze
from tf_denseflow.bijectors.transition import Transition
from tf_denseflow.config import DenseFlowConfig
from tf_denseflow.nn.coupling_net import CouplingNetwork, CrossUnitNetwork
from tf_denseflow.nn.layers import Seeds

__all__ = ['DenseFlowBijector']


class DenseFlowBijector(FlowBijector):
  """Latents `[z_1, .., z_B]` (all N(0, I)) <-> `[x, noise_1, .., noise_K]`.

  Density direction (inverse), for `x` the dequantized image in `[0, 1]` and the noise:
  ```
  h = squeeze2x2(x - 0.5)
  for block b:  h = DenseBlock_b([h, noise of block b])
                [h, z_b] = Transition_b(h)            (all blocks but the last)
  z_B = (h - loc) * exp(-log_scale)                     (the learned per-channel base)
  ```
  The factored-out halves are N(0, I) (official), and the final latent's learned per-channel
  Gaussian is written as an affine bijection of N(0, I), so the base distribution of the whole
  flow is a standard normal over every latent. Log-dets sum the Glow steps, the cross-unit
  couplings' `sum(log_sigma)` and the base's `-H*W*sum(log_scale)`.

  `forward_min_event_ndims=[3] * B`, `inverse_min_event_ndims=[3] * (1 + K)`. Keyword
  arguments: `training` (coupling-network batch norm), `data_init` (ActNorm initialisation).
  """

  def __init__(self, config: DenseFlowConfig, seeds: Optional[Seeds] = None, name='denseflow'):
    parameters = dict(locals())
    seeds = seeds or Seeds()
    self._config = config
    cfg = config
    with tf.name_scope(name) as name:
      self.squeeze = Squeeze(cfg.squeeze_order)
      self.blocks: List[DenseBlock] = []
      self.transitions: List[Transition] = []
      for b in range(cfg.num_blocks):
        self.blocks.append(self._make_block(b, seeds))
        if b < cfg.num_blocks - 1:
          self.transitions.append(Transition(cfg.squeeze_order, name=f'transition_{b}'))
      self.base = ActNorm(cfg.latent_shapes()[-1][-1], name='base')
      super().__init__(
        forward_min_event_ndims=[3] * cfg.num_blocks,
        inverse_min_event_ndims=[3] * (1 + len(cfg.noise_shapes())),
        parameters=parameters,
        name=name,
      )

  def _make_block(self, b: int, seeds: Seeds) -> DenseBlock:
    cfg = self._config
    h, w, c0 = cfg.block_shape(b)
    g = cfg.growth_rate
    units, couplings = [], []
    for i in range(cfg.units_per_block[b]):
      channels = c0 + i * g
      steps = []
      for s in range(cfg.steps_per_unit[b]):
        net = CouplingNetwork(
          in_channels=(channels + 1) // 2,
          out_channels=2 * (channels // 2),
          mid_channels=cfg.coupling_channels[b],
          depth=cfg.dense_depth,
          growth=cfg.dense_growth,
          use_attention=cfg.use_attention,
          num_landmarks=cfg.attention_landmarks,
          tokens=cfg.attention_tokens,
          compute_dtype=cfg.coupling_dtype,
          seeds=seeds,
        )
        steps.append(
          GlowStep(
            channels,
            net,
            conv_seed=seeds(),
            use_recompute_grad=cfg.use_recompute_grad,
            name=f'block{b}_unit{i}_step{s}',
          )
        )
      units.append(steps)
      if i > 0:
        if cfg.use_cross_unit_coupling:
          cond = self.cross_unit_in_channels(b, i)
          couplings.append(
            CrossUnitCoupling(
              g,
              CrossUnitNetwork(cond, g, compute_dtype=cfg.coupling_dtype, seeds=seeds),
              name=f'block{b}_cross_unit{i}',
            )
          )
        else:
          couplings.append(None)
    return DenseBlock(
      units,
      couplings,
      c0,
      g,
      include_previous=cfg.cross_unit_include_previous,
      name=f'dense_block_{b}',
    )

  def cross_unit_in_channels(self, block: int, unit: int) -> int:
    """Input channels of g_unit in `block` (official: `[x, y_0 .. y_{unit-2}]`)."""
    c0, g = self._config.block_shape(block)[2], self._config.growth_rate
    previous = unit if self._config.cross_unit_include_previous else unit - 1
    return c0 + sum(c0 + j * g for j in range(previous))

  @property
  def config(self) -> DenseFlowConfig:
    """The architecture."""
    return self._config

  @property
  def steps(self) -> List[GlowStep]:
    """Every Glow step, in density order."""
    return [step for block in self.blocks for unit in block.units for step in unit]

  def _split_noise(self, noises: Sequence[tf.Tensor]) -> List[List[tf.Tensor]]:
    out, k = [], 0
    for b in range(self._config.num_blocks):
      n = self._config.units_per_block[b] - 1
      out.append(list(noises[k : k + n]))
      k += n
    return out

  def inverse_with_terms(
    self, parts, training: bool = False, data_init: bool = False
  ) -> Tuple[List[tf.Tensor], Dict[str, tf.Tensor]]:
    """Density direction with the log-det split by component.

    Returns:
      The latents, and a dict of `[B]` log-dets: `block{b}` (Glow steps and cross-unit couplings of
      dense block b) and `base` (the learned base's `-H*W*sum(log_scale)`).
    """
    parts = list(parts)
    x, noises = parts[0], self._split_noise(parts[1:])
    h, _ = self.squeeze.inverse_and_log_det(x - 0.5)
    latents, terms = [], {}
    for b, block in enumerate(self.blocks):
      h, terms[f'block{b}'] = block.inverse_and_log_det(
        [h] + noises[b], training=training, data_init=data_init
      )
      if b < len(self.transitions):
        (h, z_out), _ = self.transitions[b].inverse_and_log_det(h)
        latents.append(z_out)
    z, terms['base'] = self.base.inverse_and_log_det(h)
    latents.append(z)
    return latents, terms

  def inverse_and_log_det(self, parts, training=False, data_init=False, **kwargs):
    latents, terms = self.inverse_with_terms(parts, training, data_init)
    return latents, tf.add_n(list(terms.values()))

  def _sample_path(self, latents, recover_noise: bool, training: bool):
    latents = list(latents)
    h, log_det = self.base.forward_and_log_det(latents[-1])
    noises = []
    for b in reversed(range(len(self.blocks))):
      if b < len(self.transitions):
        h, _ = self.transitions[b].forward_and_log_det([h, latents[b]])
      if recover_noise:
        parts, ld = self.blocks[b].forward_and_log_det(h, training=training)
        h, log_det = parts[0], log_det + ld
        noises = parts[1:] + noises
      else:
        h = self.blocks[b].sample_data(h, training=training)
    x, _ = self.squeeze.forward_and_log_det(h)
    return [x + 0.5] + noises, log_det

  def forward_and_log_det(self, latents, training=False, **kwargs):
    return self._sample_path(latents, True, training)

  def sample_data(self, latents: Sequence[tf.Tensor], training: bool = False) -> tf.Tensor:
    """Sampling direction without recovering the noise: latents -> x (g_i are not evaluated)."""
    return self._sample_path(latents, False, training)[0][0]

  def _forward_dtype(self, dtypes, **kwargs):
    return [dtypes[0]] * (1 + len(self._config.noise_shapes()))

  def _inverse_dtype(self, dtypes, **kwargs):
    return [dtypes[0]] * self._config.num_blocks

  def _forward_event_shape(self, s):
    return [tf.TensorShape(self._config.image_shape)] + [
      tf.TensorShape(n) for n in self._config.noise_shapes()
    ]

  def _inverse_event_shape(self, s):
    return [tf.TensorShape(z) for z in self._config.latent_shapes()]

  def _forward_event_shape_tensor(self, s):
    return [tf.constant(self._config.image_shape, tf.int32)] + [
      tf.constant(n, tf.int32) for n in self._config.noise_shapes()
    ]

  def _inverse_event_shape_tensor(self, s):
    return [tf.constant(z, tf.int32) for z in self._config.latent_shapes()]
