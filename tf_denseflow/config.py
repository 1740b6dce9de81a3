"""DenseFlowConfig: every architecture hyper-parameter of DenseFlow, named after the paper.

Grcic, Grubisic, Segvic. Densely connected normalizing flows. NeurIPS 2021.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import numpy as np

from tf_denseflow.checks import check_int
from tf_denseflow.config_flags import field_kind, hparam

__all__ = [
  'ATTENTION_TOKENS',
  'COUPLING_DTYPES',
  'DEQUANTIZATIONS',
  'PRESETS',
  'SQUEEZE_ORDERS',
  'DenseFlowConfig',
]

PRESETS = ('denseflow_74_10', 'small', 'tiny')  # the DenseFlowConfig classmethods of that name
DEQUANTIZATIONS = ('variational', 'uniform')
SQUEEZE_ORDERS = ('channel_major', 'space_to_depth')
ATTENTION_TOKENS = ('official', 'pixel')
COUPLING_DTYPES = ('float32', 'bfloat16', 'float16')  # also the `--precision` choices


@dataclasses.dataclass(frozen=True)
class DenseFlowConfig:
  """Architecture of a DenseFlow model (defaults: DenseFlow-74-10, the paper's model).

  The model has `len(units_per_block)` dense blocks. Block `b` has `units_per_block[b]` units of
  `steps_per_unit[b]` Glow steps each; before every unit but the first, `growth_rate` noise
  channels are appended through a cross-unit coupling. A transition (squeeze, factor out half)
  follows every block but the last.

  Attributes:
    image_shape: `(H, W, C)` of the uint8 images; H and W divisible by `2**num_blocks`.
    num_bits: bits per sub-pixel the model sees, 1..8 (Glow's `n_bits_x`). Inputs are always
      uint8-scale images (integer levels 0..255); with `num_bits < 8` the model drops their
      `8 - num_bits` low bits (`images // 2**(8 - num_bits)`), bits/dim are per
      `2**num_bits`-level dimension, and samples come back on the 0..255 scale
      (`level * 2**(8 - num_bits)`).
    units_per_block: units per dense block (paper: 6, 4, 1).
    steps_per_unit: Glow steps per unit, per block (paper: 5, 6, 20).
    coupling_channels: width of the coupling networks, per block (paper: 48).
    growth_rate: noise channels added per unit, the paper's growth rate k (paper: 10).
    dense_depth: conv layers in each coupling network's dense block (official: 7).
    dense_growth: channels each dense layer adds (official: 64).
    attention_landmarks: Nystrom landmarks m (official: 4).
    use_attention: include the Nystrom self-attention branch of the coupling network.
    attention_tokens: 'official' reproduces the raw reshape of the NCHW buffer (tokens are not
      pixels); 'pixel' uses one token per pixel (a different, cleaner model).
    use_cross_unit_coupling: condition the noise on earlier latents (g_i); False gives
      unconditional N(0, I) noise (an ablation).
    cross_unit_include_previous: False (official) feeds g_i with the block input and the outputs
      of units 0..i-2; True (paper-clean) also feeds the immediately preceding unit's output.
    squeeze_order: 'channel_major' (official, `c*4 + i*2 + j`) or 'space_to_depth' (TF order).
    dequantization: 'variational' (the official conditional flow) or 'uniform'.
    dequant_steps: coupling steps of the variational dequantization flow (official: 4).
    dequant_context_channels: channels of its context features (official: 64).
    dequant_mid_channels: width of its coupling networks (official: 64).
    dequant_depth: dense layers in its coupling networks (official: 4).
    dequant_growth: growth of those dense layers (official: 64).
    dequant_context_depth: dense layers in each context-net dense block (official: 4).
    dequant_context_growth: growth of those dense layers (official: 16).
    coupling_dtype: compute dtype of the conditioner networks ('float32', 'bfloat16' or
      'float16'; the training flag is `--precision`): the coupling networks, the cross-unit
      networks and the variational dequantization's context and coupling networks; weights,
      batch-norm statistics, the attention core and the bijector math (affine maps, log-dets,
      base log-probabilities) always stay float32.
      'float16' needs loss scaling to train (`precision.DynamicLossScale`, which the training
      step uses for it).
    use_recompute_grad: recompute coupling-network activations in the backward pass (gradient
      checkpointing) to save memory.
  """

  # Every field but image_shape is also a flag of `python -m tf_denseflow.train` (config_flags):
  # `hparam` holds its help text and bounds (an int without `maximum` is unbounded here and
  # bounded by INT32_MAX as a flag).
  image_shape: Tuple[int, int, int] = (32, 32, 3)
  num_bits: int = hparam(
    8,
    'Bits per sub-pixel the model sees (Glow n_bits_x): the uint8 inputs keep their num_bits '
    'high bits; 8 = the images as they are.',
    minimum=1,
    maximum=8,
  )
  units_per_block: Tuple[int, ...] = hparam(
    (6, 4, 1), 'Units per dense block (paper: 6,4,1); its length is the number of blocks.'
  )
  steps_per_unit: Tuple[int, ...] = hparam(
    (5, 6, 20), 'Glow steps per unit, per block (paper: 5,6,20).'
  )
  coupling_channels: Tuple[int, ...] = hparam(
    (48, 48, 48), 'Width of the coupling networks, per block (paper: 48).'
  )
  growth_rate: int = hparam(
    10, 'Growth rate k: noise channels added per unit (paper: 10).', minimum=0
  )
  dense_depth: int = hparam(
    7, 'Conv layers in the dense block of each coupling network (official: 7).', minimum=1
  )
  dense_growth: int = hparam(
    64, 'Channels each dense layer of a coupling network adds (official: 64).', minimum=1
  )
  attention_landmarks: int = hparam(
    4, 'Nystrom landmarks m of the coupling networks attention (official: 4).', minimum=1
  )
  use_attention: bool = hparam(
    True, 'Include the Nystrom self-attention branch in the coupling networks.'
  )
  attention_tokens: str = hparam(
    'official',
    'official: the raw reshape of the official NCHW buffer (tokens are not pixels); pixel: one '
    'token per pixel.',
    choices=ATTENTION_TOKENS,
  )
  use_cross_unit_coupling: bool = hparam(
    True,
    'Condition the augmentation noise on earlier latents (False: unconditional N(0, I) noise).',
  )
  cross_unit_include_previous: bool = hparam(
    False,
    'Also feed the immediately preceding unit output to the cross-unit coupling (paper text); '
    'False = official code.',
  )
  squeeze_order: str = hparam(
    'channel_major',
    'Channel order of the 2x2 squeeze: channel_major (official) or space_to_depth (TF).',
    choices=SQUEEZE_ORDERS,
  )
  dequantization: str = hparam(
    'variational',
    'Dequantization: variational (the official conditional flow) or uniform.',
    choices=DEQUANTIZATIONS,
  )
  dequant_steps: int = hparam(
    4, 'Coupling steps of the variational dequantization flow.', minimum=1
  )
  dequant_context_channels: int = hparam(
    64, 'Context feature channels of the variational dequantization.', minimum=1
  )
  dequant_mid_channels: int = hparam(
    64, 'Coupling network width of the variational dequantization.', minimum=1
  )
  dequant_depth: int = hparam(
    4, 'Dense layers per coupling network of the variational dequantization.', minimum=1
  )
  dequant_growth: int = hparam(64, 'Growth of those dense layers.', minimum=1)
  dequant_context_depth: int = hparam(
    4,
    'Dense layers per context-network dense block of the variational dequantization.',
    minimum=1,
  )
  dequant_context_growth: int = hparam(16, 'Growth of the context-network dense layers.', minimum=1)
  coupling_dtype: str = hparam(
    'float32',
    'Compute dtype of the conditioner networks (coupling, cross-unit and dequantization '
    'networks; float16 trains with dynamic loss scaling); weights, batch-norm statistics and '
    'the bijector math stay float32.',
    choices=COUPLING_DTYPES,
  )
  use_recompute_grad: bool = hparam(
    False,
    'Gradient checkpointing of the coupling networks (recompute activations in the backward '
    'pass): less memory, about one more forward pass of compute.',
  )

  def __post_init__(self):
    # Normalise every number to a Python int (frozen: use object.__setattr__), refusing floats
    # with a fraction, bools, NaN and out-of-range values by name (checks.check_int).
    for name in ('image_shape', 'units_per_block', 'steps_per_unit', 'coupling_channels'):
      value = getattr(self, name)
      if isinstance(value, (str, bytes)) or not hasattr(value, '__iter__'):
        raise ValueError(f'`{name}` must be a sequence of ints, got {value!r}.')
      value = tuple(check_int(f'{name}[{i}]', v, minimum=1) for i, v in enumerate(value))
      object.__setattr__(self, name, value)
    for name, minimum, maximum in _INT_FIELDS:
      object.__setattr__(self, name, check_int(name, getattr(self, name), minimum, maximum))
    for name in _BOOL_FIELDS:
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f'`{name}` must be a bool, got {value!r}.')
      object.__setattr__(self, name, bool(value))
    if len(self.image_shape) != 3:
      raise ValueError(f'`image_shape` must be (H, W, C), got {self.image_shape}.')
    n = len(self.units_per_block)
    if n == 0:
      raise ValueError('`units_per_block` must name at least one block.')
    for name in ('steps_per_unit', 'coupling_channels'):
      if len(getattr(self, name)) != n:
        raise ValueError(
          f'`{name}` must have one entry per block ({n}), got {getattr(self, name)}.'
        )
    if self.growth_rate == 0 and any(u > 1 for u in self.units_per_block):
      raise ValueError('`growth_rate` must be positive when a block has more than one unit.')
    h, w, _ = self.image_shape
    factor = 2**n
    if h % factor or w % factor:
      raise ValueError(
        f'`image_shape` {self.image_shape}: height and width must be divisible by {factor} '
        f'(one 2x2 squeeze per block, {n} blocks).'
      )
    for name, choices in _ENUM_FIELDS:
      value = getattr(self, name)
      if value not in choices:
        raise ValueError(f'`{name}` must be one of {choices}, got {value!r}.')
    if self.use_attention:
      for b in range(n):
        length = self.block_shape(b)[0] * self.block_shape(b)[1]
        if length % self.attention_landmarks:
          raise ValueError(
            f'`attention_landmarks`={self.attention_landmarks} must divide the attention '
            f'length {length} of block {b} (spatial size {self.block_shape(b)[:2]}).'
          )
    for b, width in enumerate(self.coupling_channels):
      if self.use_attention and width % 2:
        raise ValueError(
          f'`coupling_channels`[{b}]={width} must be even (attention embeds width/2).'
        )

  # ---------------------------------------------------------------------------------------------
  # Presets.

  @classmethod
  def denseflow_74_10(cls, image_shape=(32, 32, 3), **overrides) -> DenseFlowConfig:
    """The paper's DenseFlow-74-10 (130,647,294 trainable parameters at 32x32 and 64x64)."""
    return cls(image_shape=tuple(image_shape), **overrides)

  @classmethod
  def small(cls, image_shape=(32, 32, 3), **overrides) -> DenseFlowConfig:
    """The benchmark's `small` preset (15,280,056 trainable parameters)."""
    kwargs = dict(
      units_per_block=(2, 2, 1),
      steps_per_unit=(2, 2, 2),
      coupling_channels=(16, 16, 16),
      growth_rate=4,
    )
    kwargs.update(overrides)
    return cls(image_shape=tuple(image_shape), **kwargs)

  @classmethod
  def tiny(cls, image_shape=(16, 16, 3), **overrides) -> DenseFlowConfig:
    """The golden reference's tiny model (75,532 parameters at 16x16x3) for tests."""
    kwargs = dict(
      units_per_block=(2, 2, 1),
      steps_per_unit=(1, 1, 2),
      coupling_channels=(8, 8, 8),
      growth_rate=2,
      dense_depth=2,
      dense_growth=8,
      dequant_steps=2,
      dequant_context_channels=8,
      dequant_mid_channels=8,
      dequant_depth=2,
      dequant_growth=8,
      dequant_context_depth=2,
      dequant_context_growth=8,
    )
    kwargs.update(overrides)
    return cls(image_shape=tuple(image_shape), **kwargs)

  # ---------------------------------------------------------------------------------------------
  # Derived shapes (Python ints only: numpy ints break tracing with an unknown batch size).

  @property
  def num_blocks(self) -> int:
    """Number of dense blocks."""
    return len(self.units_per_block)

  @property
  def num_dims(self) -> int:
    """D = H * W * C, the data dimensions that bits/dim is normalised by."""
    h, w, c = self.image_shape
    return h * w * c

  def block_shape(self, block: int) -> Tuple[int, int, int]:
    """`(H, W, C)` of the input of dense block `block`."""
    h, w, c = self.image_shape
    h, w, c = h // 2, w // 2, 4 * c
    for b in range(block):
      c = self.block_output_channels(b, c) * 2  # squeeze (x4), keep half
      h, w = h // 2, w // 2
    return h, w, c

  def block_output_channels(self, block: int, in_channels: int | None = None) -> int:
    """Channels at the output of dense block `block`."""
    if in_channels is None:
      in_channels = self.block_shape(block)[2]
    return in_channels + (self.units_per_block[block] - 1) * self.growth_rate

  def noise_shapes(self) -> list:
    """Event shapes of the augmentation noise, in order (block by block, unit 1 upwards)."""
    shapes = []
    for b in range(self.num_blocks):
      h, w, _ = self.block_shape(b)
      shapes += [(h, w, self.growth_rate)] * (self.units_per_block[b] - 1)
    return shapes

  def latent_shapes(self) -> list:
    """Event shapes of the latents: the factored-out halves, then the final latent."""
    shapes = []
    for b in range(self.num_blocks):
      h, w, c = self.block_shape(b)
      c_out = self.block_output_channels(b, c)
      if b < self.num_blocks - 1:
        shapes.append((h // 2, w // 2, 2 * c_out))
      else:
        shapes.append((h, w, c_out))
    return shapes

  @property
  def bits_per_dim_scale(self) -> float:
    """Multiply a negative log-likelihood in nats by this to get bits/dim."""
    return 1.0 / (self.num_dims * math.log(2.0))


def _fields_of_kind(kind: str) -> list:
  return [f for f in dataclasses.fields(DenseFlowConfig) if field_kind(DenseFlowConfig, f) == kind]


# The checks of `__post_init__`, from the field declarations: (name, minimum, maximum) of the ints
# (`None`: unbounded), the bools, and (name, choices) of the strings.
_INT_FIELDS = tuple(
  (f.name, f.metadata['minimum'], f.metadata['maximum']) for f in _fields_of_kind('integer')
)
_BOOL_FIELDS = tuple(f.name for f in _fields_of_kind('bool'))
_ENUM_FIELDS = tuple((f.name, f.metadata['choices']) for f in _fields_of_kind('enum'))
