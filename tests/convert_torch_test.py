"""The official-checkpoint converter: config inference, the full key map, errors, and the CLI."""

import csv
import dataclasses
import gc
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import cli_testlib
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

import tf_denseflow as tdf
from tf_denseflow import convert_torch, torch_keys, workdir

GOLDEN = os.path.join(os.path.dirname(__file__), 'testdata', 'golden')
_HAS_TORCH = importlib.util.find_spec('torch') is not None
# Expected values of the official buffers that carry no state here (golden README section 5).
_BUFFER_VALUES = {
  'initialized': 1.0,
  '_shift': -0.5,
  '_scale': 1.0,
  'temperature': 1.0,
  'ldj_per_dim': -np.log(256.0),
  'running_var': 1.0,
}


def _golden_state(name):
  return convert_torch.read_state_dict(os.path.join(GOLDEN, f'{name}_official.npz'))[0]


def _listing(name):
  """`{key: (shape, dtype, kind)}` from a golden `*_keys.tsv`."""
  with open(os.path.join(GOLDEN, f'{name}_keys.tsv')) as f:
    rows = list(csv.DictReader(f, delimiter='\t'))
  shape = lambda s: () if s == 'scalar' else tuple(int(d) for d in s.split('x'))  # noqa: E731
  return {r['key']: (shape(r['shape']), r['dtype'], r['kind']) for r in rows}


def _synthetic_state(listing):
  """Zeros with the listed shapes and dtypes; buffers with the values the official code holds."""
  state = {}
  for key, (shape, dtype, _) in listing.items():
    value = _BUFFER_VALUES.get(key.rsplit('.', 1)[-1])
    state[key] = np.zeros(shape, dtype) if value is None else np.full(shape, value, dtype)
  return state


def _official_state(model):
  """The state_dict the official code would hold for `model` (inverse of the key map)."""
  inverse = {
    torch_keys._conv: lambda v: np.transpose(v, (3, 2, 0, 1)),
    torch_keys._vec: lambda v: np.reshape(v, (1, -1, 1, 1)),
    torch_keys._same: lambda v: v,
  }
  state = {
    key: inverse[transform](variable.numpy())
    for key, (variable, transform) in convert_torch.official_key_map(model).items()
  }
  state['transforms.0.ldj_per_dim'] = np.float32(-np.log(256.0))
  state['transforms.3.blocks.0.transforms.0.transforms.0.initialized'] = np.ones([1], np.float32)
  return state


def _tempdir(test):
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def _golden_total(model, name):
  data = np.load(os.path.join(GOLDEN, f'{name}_official.npz'))
  noise_keys = sorted(k for k in data.files if k.startswith('noise/'))
  terms = model.elbo_terms(
    data['x'],
    dequant_noise=_nhwc(data[noise_keys[0]]),
    noise=[_nhwc(data[k]) for k in noise_keys[1:]],
  )
  return terms['total'].numpy(), data['ll/total']


class ConfigInferenceTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ('tiny', 'tiny', (2, 2, 1)),
    ('tiny_3units', 'tiny_3units', (3, 2, 1)),
  )
  def test_golden_state_dicts_give_the_tiny_configs(self, name, units):
    config = convert_torch.config_from_state_dict(_golden_state(name), (16, 16))
    self.assertEqual(config, tdf.DenseFlowConfig.tiny(units_per_block=units))

  @parameterized.parameters(32, 64)
  def test_full_listing_gives_denseflow_74_10(self, size):
    state = _synthetic_state(_listing('full'))
    config = convert_torch.config_from_state_dict(state, (size, size, 3))
    self.assertEqual(config, tdf.DenseFlowConfig.denseflow_74_10((size, size, 3)))

  @parameterized.named_parameters(
    ('include_previous', dict(cross_unit_include_previous=True)),
    ('no_cross_unit_coupling', dict(use_cross_unit_coupling=False)),
    ('no_attention', dict(use_attention=False)),
    ('deeper', dict(units_per_block=(3, 1), steps_per_unit=(2, 1), coupling_channels=(6, 4))),
    ('uniform_dequantization', dict(dequantization='uniform')),
  )
  def test_variants_round_trip(self, overrides):
    config = tdf.DenseFlowConfig.tiny(**overrides)
    state = _official_state(tdf.DenseFlow(config))
    inferred = convert_torch.config_from_state_dict(state, config.image_shape)
    if config.dequantization == 'uniform':  # no parameters tell the (unused) flow's sizes
      defaults = tdf.DenseFlowConfig()
      dequant = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(config)}
      config = dataclasses.replace(
        config, **{k: v for k, v in dequant.items() if k.startswith('dequant_')}
      )
    self.assertEqual(inferred, config)

  def test_channel_mismatch_is_refused(self):
    with self.assertRaisesRegex(convert_torch.ConversionError, '3-channel images'):
      convert_torch.config_from_state_dict(_golden_state('tiny'), (16, 16, 1))

  def test_indivisible_image_size_is_refused(self):
    with self.assertRaisesRegex(convert_torch.ConversionError, 'divisible by 8'):
      convert_torch.config_from_state_dict(_golden_state('tiny'), (20, 20))

  @parameterized.named_parameters(('one_bit', 1), ('five_bits', 5), ('eight_bits', 8))
  def test_num_bits_is_inferred_from_ldj_per_dim(self, bits):
    state = _golden_state('tiny')
    state['transforms.0.ldj_per_dim'] = np.float32(-bits * np.log(2.0))
    self.assertEqual(convert_torch.config_from_state_dict(state, (16, 16)).num_bits, bits)

  @parameterized.named_parameters(
    ('nine_bits', -9 * np.log(2.0), 'gives num_bits = 9; num_bits must be in 1..8'),
    ('zero_bits', 0.0, 'gives num_bits = 0; num_bits must be in 1..8'),
    ('not_whole_bits', -2.5 * np.log(2.0), 'is not -num_bits ln 2'),
    ('nan', np.nan, 'is not -num_bits ln 2'),
    ('not_a_scalar', np.zeros([2]), 'transforms.0.ldj_per_dim: not a number'),
  )
  def test_bad_ldj_per_dim_is_refused_by_name(self, value, message):
    state = _golden_state('tiny')
    state['transforms.0.ldj_per_dim'] = np.asarray(value, np.float32)
    with self.assertRaisesRegex(convert_torch.ConversionError, message):
      convert_torch.config_from_state_dict(state, (16, 16))

  def test_not_a_denseflow_is_refused(self):
    with self.assertRaisesRegex(convert_torch.ConversionError, 'Not a DenseFlow state_dict'):
      convert_torch.config_from_state_dict({'fc.weight': np.zeros([2, 2])}, (16, 16))


class FullModelKeyMapTest(tf.test.TestCase):
  """DenseFlow-74-10 at 64x64 against the official listing (built once: ~15 s, ~1 GB)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.listing = _listing('full')
    cls.model = tdf.DenseFlow(tdf.DenseFlowConfig.denseflow_74_10((64, 64, 3)))
    cls.key_map = convert_torch.official_key_map(cls.model)

  @classmethod
  def tearDownClass(cls):
    del cls.model, cls.key_map
    gc.collect()
    super().tearDownClass()

  def test_every_key_maps_with_none_left_over(self):
    listed = set(self.listing)
    self.assertEmpty(set(self.key_map) - listed)
    left = listed - set(self.key_map)
    self.assertEqual(left, {k for k in listed if torch_keys._stateless_buffer(k)})
    self.assertTrue(all(self.listing[k][2] == 'buffer' for k in left))
    self.assertLen(left, 302 - 2 * 74)  # buffers minus the BN running statistics
    self.assertLen(self.key_map, 3725 - len(left))
    for key, (variable, transform) in self.key_map.items():
      shape = transform(np.zeros(self.listing[key][0], np.float32)).shape
      self.assertEqual(tuple(shape), tuple(variable.shape), key)

  def test_every_variable_is_mapped(self):
    mapped = {id(v) for v, _ in self.key_map.values()}
    variables = self.model.trainable_variables + self.model.non_trainable_keras_variables
    self.assertEqual({id(v) for v in variables}, mapped)
    trainable = sum(
      int(np.prod(shape)) for shape, _, kind in self.listing.values() if kind == 'parameter'
    )
    self.assertEqual(trainable, 130_647_294)
    self.assertEqual(self.model.num_parameters(), trainable)

  def test_synthetic_state_dict_loads(self):
    state = _synthetic_state(self.listing)
    rng = np.random.default_rng(0)
    conv = 'transforms.5.blocks.3.transforms.5.transforms.2.coupling_net.0.dn.transform.1.dense.6.nn.2.weight'
    matrix = 'transforms.7.blocks.0.transforms.19.transforms.1.weight'
    loc = 'base_dist.loc'
    running_var = 'transforms.3.blocks.5.transforms.4.transforms.2.coupling_net.0.dn.transform.1.mix_conv.0.running_var'
    for key in (conv, matrix, loc, running_var):
      state[key] = rng.uniform(0.5, 1.5, state[key].shape).astype(np.float32)
    assigned = convert_torch.load_state_dict(self.model, state)
    self.assertLen(assigned, len(self.key_map))
    self.assertAllEqual(self.key_map[conv][0], np.transpose(state[conv], (2, 3, 1, 0)))
    self.assertAllEqual(self.key_map[matrix][0], state[matrix])
    self.assertAllEqual(self.key_map[loc][0], state[loc].reshape(-1))
    self.assertAllEqual(self.key_map[running_var][0], state[running_var])
    self.assertTrue(self.model.is_initialized)


class FullModel32KeyMapTest(tf.test.TestCase):
  @pytest.mark.slow  # a second 130M-parameter build (~15 s); the listing test above covers 64x64
  def test_32x32_map_is_the_same_listing(self):
    listing = _listing('full')
    model = tdf.DenseFlow(tdf.DenseFlowConfig.denseflow_74_10((32, 32, 3)))
    key_map = convert_torch.official_key_map(model)
    self.assertEqual(set(key_map), {k for k in listing if not torch_keys._stateless_buffer(k)})
    for key, (variable, transform) in key_map.items():
      shape = transform(np.zeros(listing[key][0], np.float32)).shape
      self.assertEqual(tuple(shape), tuple(variable.shape), key)
    self.assertEqual(model.config.latent_shapes()[-1], (4, 4, 308))


class LoadErrorsTest(tf.test.TestCase, parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.state = _golden_state('tiny')
    self.model = tdf.DenseFlow(tdf.DenseFlowConfig.tiny())

  def _assert_refused(self, pattern, **kwargs):
    before = [v.numpy() for v in self.model.trainable_variables]
    with self.assertRaisesRegex(convert_torch.ConversionError, pattern):
      convert_torch.load_state_dict(self.model, self.state, **kwargs)
    for b, v in zip(before, self.model.trainable_variables):  # nothing assigned
      self.assertAllEqual(b, v)
    self.assertFalse(self.model.is_initialized)

  def test_missing_key(self):
    key = 'transforms.5.noise_params.0.transformation.2.bias'
    del self.state[key]
    self._assert_refused(f'1 missing key.*{key}')

  def test_unexpected_key(self):
    key = 'transforms.3.blocks.0.transforms.0.transforms.9.weight'
    self.state[key] = np.zeros([3, 3], np.float32)
    self._assert_refused(f'1 unexpected key.*{key}')
    convert_torch.load_state_dict(self.model, self.state, strict=False)

  def test_wrong_shape(self):
    key = 'transforms.3.blocks.1.transforms.0.transforms.1.weight'
    self.state[key] = np.zeros([12, 12], np.float32)
    self._assert_refused(rf'{key}: shape \(12, 12\).*expects \(14, 14\)')

  def test_non_finite_value(self):
    key = 'base_dist.log_scale'
    self.state[key] = np.full_like(self.state[key], np.nan)
    self._assert_refused(f'{key}: holds non-finite')

  def test_value_that_overflows_float32_is_refused(self):
    # Finite in float64, Inf after the cast to the variables' float32.
    key = 'base_dist.loc'
    self.state[key] = np.full(self.state[key].shape, 1e39, np.float64)
    self._assert_refused(f'{key}: holds non-finite values \\(in float32\\)')

  def test_non_numeric_value_is_refused(self):
    key = 'base_dist.loc'
    self.state[key] = np.full(self.state[key].shape, 'x')
    self._assert_refused(f'{key}: holds <U1 values, not numbers')

  def test_uninitialized_actnorm(self):
    key = 'transforms.3.blocks.0.transforms.0.transforms.0.initialized'
    self.state[key] = np.zeros_like(self.state[key])
    self._assert_refused(f'{key}: expected 1.0')

  def test_preset_mismatch(self):
    path = os.path.join(GOLDEN, 'tiny_official.npz')
    with self.assertRaisesRegex(convert_torch.ConversionError, r'not the preset: .*steps_per_unit'):
      convert_torch.convert_checkpoint(path, _tempdir(self), 16, preset='small')

  @parameterized.named_parameters(
    ('unknown_suffix', 'tiny_keys.tsv', convert_torch.ConversionError, 'unknown checkpoint type'),
    ('no_file', 'nope.npz', FileNotFoundError, 'No such checkpoint'),
  )
  def test_unreadable_file(self, name, error, pattern):
    with self.assertRaisesRegex(error, pattern):
      convert_torch.read_state_dict(os.path.join(GOLDEN, name))

  def test_pt_without_torch_says_how_to_install(self):
    path = os.path.join(_tempdir(self), 'checkpoint.pt')
    open(path, 'wb').close()
    with mock.patch.dict(sys.modules, {'torch': None}):
      with self.assertRaisesRegex(convert_torch.ConversionError, r'pip install \.\[torch\]'):
        convert_torch.read_state_dict(path)


class CliTest(tf.test.TestCase):
  def _run(self, *args):
    return subprocess.run(
      [sys.executable, '-m', 'tf_denseflow.convert_torch', *args],
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
    )

  def test_converts_golden_tiny_to_a_complete_workdir(self):
    out = os.path.join(_tempdir(self), 'workdir')
    checkpoint = os.path.join(GOLDEN, 'tiny_official.npz')
    result = self._run(f'--checkpoint={checkpoint}', f'--out={out}', '--image_size=16', '--step=5')
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn('Wrote', result.stdout)
    model, step = workdir.restore_model(out)
    self.assertEqual(step, 5)
    self.assertEqual(model.config, tdf.DenseFlowConfig.tiny())
    self.assertTrue(model.is_initialized)
    state = _golden_state('tiny')
    for key, (variable, transform) in convert_torch.official_key_map(model).items():
      self.assertAllEqual(variable, transform(state[key]), msg=key)
    got, want = _golden_total(model, 'tiny')
    self.assertAllClose(got, want, rtol=1e-5, atol=1e-3)

  def _assert_one_line_error(self, drop, image_size, pattern):
    tmp = _tempdir(self)
    checkpoint = os.path.join(tmp, 'state.npz')
    state = _golden_state('tiny')
    state.pop(drop, None)
    np.savez(checkpoint, **state)
    result = self._run(
      f'--checkpoint={checkpoint}', f'--out={tmp}/out', f'--image_size={image_size}'
    )
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertNotIn('Traceback', result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    self.assertStartsWith(last, 'error: ')
    self.assertRegex(last, pattern)
    self.assertFalse(os.path.exists(os.path.join(tmp, 'out')))

  def test_missing_key_gives_one_line_error(self):
    key = 'transforms.7.blocks.0.transforms.1.transforms.1.weight'
    self._assert_one_line_error(key, 16, f'1 missing key.*{key}')

  @pytest.mark.slow  # in-process: ConfigInferenceTest.test_indivisible_image_size_is_refused
  def test_bad_image_size_gives_one_line_error(self):
    self._assert_one_line_error(None, 20, 'divisible by 8')

  def test_bad_input_through_main_fails_with_one_line(self):
    # The parser and main of `python -m tf_denseflow.convert_torch`, as app.run calls them.
    tmp = _tempdir(self)
    golden = os.path.join(GOLDEN, 'tiny_official.npz')

    def npz(name, **changes):
      state = _golden_state('tiny')
      state.update(changes)
      path = os.path.join(tmp, f'{name}.npz')
      np.savez(path, **state)
      return path

    truncated = npz('truncated')
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    nine_bits = npz('nine_bits', **{'transforms.0.ldj_per_dim': np.float32(-9 * np.log(2.0))})
    shape = _golden_state('tiny')['base_dist.log_scale'].shape
    overflow = npz('overflow', **{'base_dist.log_scale': np.full(shape, 1e39)})
    garbage_pt = os.path.join(tmp, 'garbage.pt')
    with open(garbage_pt, 'wb') as f:
      f.write(b'not a checkpoint')
    out = f'--out={tmp}/out'
    cases = {
      'truncated npz': ([f'--checkpoint={truncated}', out, '--image_size=16'], truncated),
      'garbage pt': ([f'--checkpoint={garbage_pt}', out, '--image_size=16'], garbage_pt),
      'no such file': ([f'--checkpoint={tmp}/nope.npz', out, '--image_size=16'], 'No such'),
      'num_bits 9': ([f'--checkpoint={nine_bits}', out, '--image_size=16'], 'num_bits = 9'),
      'float32 overflow': (
        [f'--checkpoint={overflow}', out, '--image_size=16'],
        'base_dist.log_scale: holds non-finite values (in float32)',
      ),
      'zero image_size': ([f'--checkpoint={golden}', out, '--image_size=0'], '--image_size'),
      'negative step': ([f'--checkpoint={golden}', out, '--image_size=16', '--step=-1'], '--step'),
      'missing out': ([f'--checkpoint={golden}', '--image_size=16'], '--out is required'),
      'out is a file': ([f'--checkpoint={golden}', f'--out={golden}', '--image_size=16'], golden),
    }
    results = cli_testlib.run_cases(
      'tf_denseflow.convert_torch:define_convert_flags',
      'tf_denseflow.flags:parse_flags',
      'tf_denseflow.convert_torch:main',
      [args for args, _ in cases.values()],
    )
    for (name, (_, needle)), result in zip(cases.items(), results):
      with self.subTest(name):
        cli_testlib.assert_one_line_error(self, result, needle)
    self.assertFalse(os.path.exists(os.path.join(tmp, 'out')))


class TorchCheckpointTest(tf.test.TestCase):
  def test_reads_the_official_checkpoint_dict(self):
    if not _HAS_TORCH:
      self.skipTest('torch is not installed (pip install .[torch])')
    import torch

    state = _golden_state('tiny')
    tmp = _tempdir(self)
    path = os.path.join(tmp, 'checkpoint.pt')
    torch.save(
      {
        'current_epoch': 3,
        'train_metrics': {'bpd': [3.5, 3.4]},
        'model': {f'module.{k}': torch.from_numpy(v) for k, v in state.items()},
        'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-3, 'params': [0]}]},
        'scheduler_iter': {'last_epoch': 10, 'base_lrs': [1e-3]},
        'scheduler_epoch': None,
      },
      path,
    )
    read, info = convert_torch.read_state_dict(path)
    self.assertEqual(info, {'current_epoch': 3})
    self.assertEqual(set(read), set(state))
    for key in state:
      self.assertAllEqual(read[key], state[key])
    convert_torch.convert_checkpoint(path, os.path.join(tmp, 'out'), 16, log=lambda _: None)
    got, want = _golden_total(workdir.restore_model(os.path.join(tmp, 'out'))[0], 'tiny')
    self.assertAllClose(got, want, rtol=1e-5, atol=1e-3)


if __name__ == '__main__':
  tf.test.main()
