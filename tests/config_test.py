"""Tests for tf_denseflow.config (DenseFlowConfig): validation, derived shapes, presets, and the
presets' exact parameter counts (built models, plus a closed-form count as a second opinion).
"""

import dataclasses
import gc

import flow_testlib as lib
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_denseflow as tdf

Config = tdf.DenseFlowConfig

# Reference numbers: the official PyTorch model's state_dict (reference/golden/README.md).
_DENSEFLOW_74_10_PARAMS = 130_647_294
_DENSEFLOW_74_10_DEQUANT_PARAMS = 2_395_784
_DENSEFLOW_74_10_BLOCK_PARAMS = (48_061_410, 46_453_404, 33_736_080)
_DENSEFLOW_74_10_BASE_PARAMS = 616
_SMALL_PARAMS = 15_280_056
_TINY_PARAMS = 75_532


# -------------------------------------------------------------------------------------------------
# A closed-form parameter count (independent of the Keras code; from the architecture alone).


def _dense_conv_block(c, out, depth, growth):
  n = 0
  for _ in range(depth):
    n += c * c + c  # conv1x1 c -> c
    n += 9 * c * growth + growth  # conv3x3 c -> growth
    c += growth
  return n + c * 3 * out + 3 * out  # gated conv1x1 c -> 3 * out


def _coupling_net(cin, cout, mid, depth, growth, use_attention):
  embed = mid // 2
  n = cin * mid + mid  # projection
  if use_attention:
    n += mid * 3 * embed + 3 * embed + embed * mid + mid  # qkv, output projection
  n += _dense_conv_block(mid, mid, depth, growth)
  branches = 2 if use_attention else 1
  n += 2 * branches * mid + branches * mid * mid  # batch norm gamma/beta, mix conv (no bias)
  return n + mid * cout + cout  # zero-initialised output conv


def _count_parameters(cfg: Config) -> dict:
  counts = {}
  h, w, c = cfg.image_shape
  g = cfg.growth_rate
  for b in range(cfg.num_blocks):
    c0 = cfg.block_shape(b)[2]
    n = 0
    for i in range(cfg.units_per_block[b]):
      ci = c0 + i * g
      step = 2 * ci + ci * ci  # ActNorm, 1x1 conv
      step += _coupling_net(
        (ci + 1) // 2,
        2 * (ci // 2),
        cfg.coupling_channels[b],
        cfg.dense_depth,
        cfg.dense_growth,
        cfg.use_attention,
      )
      n += cfg.steps_per_unit[b] * step
      if i > 0 and cfg.use_cross_unit_coupling:
        previous = i if cfg.cross_unit_include_previous else i - 1
        cin = c0 + sum(c0 + j * g for j in range(previous))
        n += 9 * cin * 4 * cin + 4 * cin + 4 * cin * 2 * g + 2 * g
    counts[f'block{b}'] = n
  counts['base'] = 2 * cfg.latent_shapes()[-1][-1]
  if cfg.dequantization == 'variational':
    c4, ctx = 4 * c, cfg.dequant_context_channels
    half = (c4 + 1) // 2
    n = 2 * c4 + (cfg.dequant_steps + 1) * c4 * c4  # base loc/log_scale, 1x1 convs
    n += _dense_conv_block(c, ctx, cfg.dequant_context_depth, cfg.dequant_context_growth)
    n += 4 * ctx * ctx + ctx  # 2x2 stride-2 conv
    n += _dense_conv_block(ctx, ctx, cfg.dequant_context_depth, cfg.dequant_context_growth)
    mid, cout = cfg.dequant_mid_channels, 2 * (c4 - half)
    net = (half + ctx) * mid + mid
    net += _dense_conv_block(mid, mid, cfg.dequant_depth, cfg.dequant_growth)
    net += mid * cout + cout
    counts['dequantization'] = n + cfg.dequant_steps * net
  else:
    counts['dequantization'] = 0
  counts['total'] = sum(counts.values())
  return counts


# -------------------------------------------------------------------------------------------------


class DenseFlowConfigTest(tf.test.TestCase, parameterized.TestCase):
  def test_defaults_are_the_paper_model(self):
    cfg = Config()
    self.assertEqual(cfg, Config.denseflow_74_10())
    self.assertEqual(cfg.image_shape, (32, 32, 3))
    self.assertEqual(cfg.units_per_block, (6, 4, 1))
    self.assertEqual(cfg.steps_per_unit, (5, 6, 20))
    self.assertEqual(sum(u * s for u, s in zip(cfg.units_per_block, cfg.steps_per_unit)), 74)
    self.assertEqual(cfg.growth_rate, 10)
    self.assertEqual(cfg.coupling_channels, (48, 48, 48))
    self.assertEqual((cfg.dense_depth, cfg.dense_growth, cfg.attention_landmarks), (7, 64, 4))
    self.assertEqual(cfg.dequantization, 'variational')
    self.assertEqual(cfg.squeeze_order, 'channel_major')
    self.assertEqual(cfg.attention_tokens, 'official')
    self.assertFalse(cfg.cross_unit_include_previous)

  def test_derived_shapes_of_denseflow_74_10(self):
    cfg = Config.denseflow_74_10()
    self.assertEqual(
      [cfg.block_shape(b) for b in range(3)], [(16, 16, 12), (8, 8, 124), (4, 4, 308)]
    )
    self.assertEqual([cfg.block_output_channels(b) for b in range(3)], [62, 154, 308])
    self.assertEqual(cfg.latent_shapes(), [(8, 8, 124), (4, 4, 308), (4, 4, 308)])
    self.assertEqual(cfg.noise_shapes(), [(16, 16, 10)] * 5 + [(8, 8, 10)] * 3)
    self.assertEqual(cfg.num_dims, 3072)
    self.assertAlmostEqual(cfg.bits_per_dim_scale, 1.0 / (3072 * np.log(2.0)))
    big = Config.denseflow_74_10(image_shape=(64, 64, 3))
    self.assertEqual(big.latent_shapes()[-1], (8, 8, 308))
    # Latent and data+noise dimensions agree (the flow is a bijection of the joint space).
    for c in (cfg, big, Config.tiny(), Config.small()):
      data = c.num_dims + sum(int(np.prod(s)) for s in c.noise_shapes())
      self.assertEqual(sum(int(np.prod(s)) for s in c.latent_shapes()), data)

  def test_shapes_are_python_ints(self):
    cfg = Config(image_shape=np.array([32, 32, 3]), units_per_block=[6, 4, 1])
    self.assertEqual(cfg.image_shape, (32, 32, 3))
    self.assertIsInstance(cfg.units_per_block, tuple)
    for shape in [cfg.image_shape, *cfg.latent_shapes(), *cfg.noise_shapes()]:
      self.assertTrue(all(type(d) is int for d in shape), msg=str(shape))

  def test_frozen(self):
    cfg = Config()
    with self.assertRaises(dataclasses.FrozenInstanceError):
      cfg.growth_rate = 4
    self.assertEqual(dataclasses.replace(cfg, growth_rate=4).growth_rate, 4)

  def test_presets_and_overrides(self):
    small = Config.small()
    self.assertEqual(small.units_per_block, (2, 2, 1))
    self.assertEqual(small.coupling_channels, (16, 16, 16))
    tiny = Config.tiny(units_per_block=(3, 2, 1))
    self.assertEqual(tiny.image_shape, (16, 16, 3))
    self.assertEqual(tiny.units_per_block, (3, 2, 1))
    self.assertEqual(Config.denseflow_74_10((64, 64, 3), growth_rate=12).growth_rate, 12)

  @parameterized.named_parameters(
    ('image_not_divisible', dict(image_shape=(30, 30, 3)), 'image_shape'),
    (
      'image_not_divisible_4_blocks',
      dict(
        image_shape=(8, 8, 3),
        units_per_block=(1,) * 4,
        steps_per_unit=(1,) * 4,
        coupling_channels=(4,) * 4,
      ),
      'image_shape',
    ),
    ('image_rank', dict(image_shape=(32, 32)), 'image_shape'),
    ('image_not_positive', dict(image_shape=(0, 32, 3)), 'image_shape'),
    ('image_not_a_sequence', dict(image_shape=32), 'image_shape'),
    ('landmarks_do_not_divide_length', dict(attention_landmarks=3), 'attention_landmarks'),
    ('landmarks_zero', dict(attention_landmarks=0), 'attention_landmarks'),
    (
      'no_blocks',
      dict(units_per_block=(), steps_per_unit=(), coupling_channels=()),
      'units_per_block',
    ),
    ('units_not_positive', dict(units_per_block=(6, 0, 1)), 'units_per_block'),
    ('steps_not_positive', dict(steps_per_unit=(5, 6, 0)), 'steps_per_unit'),
    ('steps_length', dict(steps_per_unit=(5, 6)), 'steps_per_unit'),
    ('widths_not_positive', dict(coupling_channels=(48, -2, 48)), 'coupling_channels'),
    ('widths_length', dict(coupling_channels=(48,)), 'coupling_channels'),
    ('width_odd_with_attention', dict(coupling_channels=(48, 47, 48)), 'coupling_channels'),
    ('growth_rate_negative', dict(growth_rate=-1), 'growth_rate'),
    ('growth_rate_zero_with_units', dict(growth_rate=0), 'growth_rate'),
    ('num_bits_zero', dict(num_bits=0), 'num_bits'),
    ('dense_depth_zero', dict(dense_depth=0), 'dense_depth'),
    ('dense_growth_negative', dict(dense_growth=-64), 'dense_growth'),
    ('dequant_steps_zero', dict(dequant_steps=0), 'dequant_steps'),
    ('dequant_context_channels_zero', dict(dequant_context_channels=0), 'dequant_context_channels'),
    ('dequant_mid_channels_zero', dict(dequant_mid_channels=0), 'dequant_mid_channels'),
    ('dequant_depth_zero', dict(dequant_depth=0), 'dequant_depth'),
    ('dequant_growth_zero', dict(dequant_growth=0), 'dequant_growth'),
    ('dequant_context_depth_zero', dict(dequant_context_depth=0), 'dequant_context_depth'),
    ('dequant_context_growth_zero', dict(dequant_context_growth=0), 'dequant_context_growth'),
    ('bad_dequantization', dict(dequantization='gaussian'), 'dequantization'),
    ('bad_squeeze_order', dict(squeeze_order='row_major'), 'squeeze_order'),
    ('bad_attention_tokens', dict(attention_tokens='patch'), 'attention_tokens'),
    ('bad_coupling_dtype', dict(coupling_dtype='float64'), 'coupling_dtype'),
  )
  def test_bad_arguments_raise_naming_the_argument(self, kwargs, argument):
    with self.assertRaisesRegex(ValueError, f'`{argument}(\\[\\d+\\])?`'):
      Config(**kwargs)

  def test_valid_edge_cases(self):
    Config(growth_rate=0, units_per_block=(1, 1, 1))  # no noise at all
    Config(use_attention=False, coupling_channels=(47, 47, 47), attention_landmarks=3)
    Config(image_shape=(16, 16, 3), attention_landmarks=2)  # 2x2 last block, 4 tokens
    Config.tiny(
      image_shape=(8, 8, 1),
      units_per_block=(2, 2),
      steps_per_unit=(1, 1),
      coupling_channels=(4, 4),
      attention_landmarks=2,
    )


class ParameterCountTest(tf.test.TestCase, parameterized.TestCase):
  """Exact trainable-parameter counts of the presets (built models: the acceptance numbers)."""

  @parameterized.named_parameters(('32x32', 32), ('64x64', 64))
  def test_denseflow_74_10(self, size):
    model = tdf.DenseFlow(Config.denseflow_74_10(image_shape=(size, size, 3)))
    try:
      self.assertEqual(model.num_parameters(), _DENSEFLOW_74_10_PARAMS)
      dequant = lib.all_trainable_variables(model.dequantizer)
      self.assertEqual(
        sum(v.shape.num_elements() for v in dequant), _DENSEFLOW_74_10_DEQUANT_PARAMS
      )
      for b, want in enumerate(_DENSEFLOW_74_10_BLOCK_PARAMS):
        block = lib.all_trainable_variables(model.bijector.blocks[b])
        self.assertEqual(sum(v.shape.num_elements() for v in block), want, msg=f'block {b}')
      base = lib.all_trainable_variables(model.bijector.base)
      self.assertEqual(sum(v.shape.num_elements() for v in base), _DENSEFLOW_74_10_BASE_PARAMS)
      self.assertEmpty(lib.all_trainable_variables(model.bijector.squeeze))
    finally:
      del model
      gc.collect()

  @parameterized.named_parameters(
    ('small', Config.small, _SMALL_PARAMS), ('tiny', Config.tiny, _TINY_PARAMS)
  )
  def test_small_presets(self, preset, want):
    model = tdf.DenseFlow(preset())
    self.assertEqual(model.num_parameters(), want)
    self.assertEqual(_count_parameters(preset())['total'], want)
    dequant = lib.all_trainable_variables(model.dequantizer)
    self.assertEqual(
      sum(v.shape.num_elements() for v in dequant), _count_parameters(preset())['dequantization']
    )

  @parameterized.named_parameters(
    ('denseflow_74_10_32', Config.denseflow_74_10()),
    ('denseflow_74_10_64', Config.denseflow_74_10(image_shape=(64, 64, 3))),
    ('denseflow_74_10_128', Config.denseflow_74_10(image_shape=(128, 128, 3))),
  )
  def test_closed_form_count_of_denseflow_74_10(self, cfg):
    counts = _count_parameters(cfg)
    self.assertEqual(counts['total'], _DENSEFLOW_74_10_PARAMS)
    self.assertEqual(counts['dequantization'], _DENSEFLOW_74_10_DEQUANT_PARAMS)
    self.assertEqual(tuple(counts[f'block{b}'] for b in range(3)), _DENSEFLOW_74_10_BLOCK_PARAMS)
    self.assertEqual(counts['base'], _DENSEFLOW_74_10_BASE_PARAMS)

  @parameterized.named_parameters(
    ('tiny_3units', Config.tiny(units_per_block=(3, 2, 1))),
    ('include_previous', Config.tiny(cross_unit_include_previous=True)),
    ('no_attention_uniform', Config.tiny(use_attention=False, dequantization='uniform')),
    ('no_cross_unit', Config.tiny(use_cross_unit_coupling=False)),
  )
  def test_closed_form_count_matches_built_models(self, cfg):
    model = tdf.DenseFlow(cfg)
    self.assertEqual(model.num_parameters(), _count_parameters(cfg)['total'])
    self.assertEqual(
      sum(v.shape.num_elements() for v in lib.all_trainable_variables(model.dequantizer)),
      _count_parameters(cfg)['dequantization'],
    )

  def test_closed_form_count_of_the_golden_tiny_3units(self):
    self.assertEqual(_count_parameters(Config.tiny(units_per_block=(3, 2, 1)))['total'], 111_892)


if __name__ == '__main__':
  tf.test.main()
