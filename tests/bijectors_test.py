"""Tests for tf_denseflow.bijectors: the STYLE.md section 2.4 contract for every bijector, plus
golden values, identity at initialisation, TFP composition and bad arguments.

`BijectorContractTest` runs the shared assertions of `flow_testlib` over every bijector case
(tiny events; zero-initialised convs and ActNorm perturbed so the maps are not the identity). The
per-class tests below it hold what is specific to one bijector.
"""

import itertools
import zlib

import flow_testlib as lib
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from absl.testing import parameterized

from tf_denseflow import bijectors as B
from tf_denseflow.nn import CouplingNetwork, CrossUnitNetwork, Seeds

tfb = tfp.bijectors
tfd = tfp.distributions

# Round trips run in float32 through up to 6 conditioner networks: 1e-4 absolute on O(1) values.
_ROUND_TRIP_ATOL = 1e-4
# The float64 Jacobian check: the bijector math runs in float64 (the networks in float32, which
# only enters through off-diagonal blocks of the triangular Jacobians).
_JACOBIAN_ATOL = 1e-6
_LOG_DET_ATOL = 1e-4


# -------------------------------------------------------------------------------------------------
# Tiny instances.


def _coupling_net(channels, seed, use_attention=True, context=0):
  """The DenseFlow coupling network for an AffineCoupling on `channels` (tiny widths)."""
  return CouplingNetwork(
    in_channels=(channels + 1) // 2 + context,
    out_channels=2 * (channels // 2),
    mid_channels=4,
    depth=1,
    growth=4,
    use_attention=use_attention,
    num_landmarks=2,
    seeds=Seeds(seed),
  )


def _num_coupling_net_vars(depth=1, use_attention=True):
  # project (kernel, bias) + [attention qkv, out: 2 + 2] + dense layers (conv_in, conv_out: 4 per
  # layer) + gate (2) + batch norm (gamma, beta) + mix (kernel only) + zero-init out (2).
  return 2 + (4 if use_attention else 0) + 4 * depth + 2 + 2 + 1 + 2


def _glow_step(channels, seed, use_attention=True, name='glow_step'):
  return B.GlowStep(
    channels,
    _coupling_net(channels, seed, use_attention),
    conv_seed=tf.constant([seed, 99]),
    name=name,
  )


def _cross_unit_in_channels(c0, g, unit, include_previous):
  previous = unit if include_previous else unit - 1
  return c0 + sum(c0 + j * g for j in range(previous))


def _dense_block(
  num_units, include_previous=False, use_couplings=True, c0=3, g=2, seed=0, steps_per_unit=1
):
  units, couplings = [], []
  for i in range(num_units):
    units.append(
      [
        _glow_step(c0 + i * g, seed * 100 + 10 * i + s, use_attention=False, name=f'u{i}s{s}')
        for s in range(steps_per_unit)
      ]
    )
    if i > 0:
      cin = _cross_unit_in_channels(c0, g, i, include_previous)
      couplings.append(
        B.CrossUnitCoupling(g, CrossUnitNetwork(cin, g, seeds=Seeds(seed * 100 + 50 + i)))
      )
  return B.DenseBlock(
    units,
    couplings if use_couplings else None,
    c0,
    g,
    include_previous=include_previous,
  )


def _dense_block_case(num_units, include_previous=False, use_couplings=True):
  c0, g = 3, 2
  num_vars = num_units * (3 + _num_coupling_net_vars(use_attention=False))
  num_vars += 4 * (num_units - 1) if use_couplings else 0
  return dict(
    make=lambda: _dense_block(num_units, include_previous, use_couplings, c0, g),
    z=[2, 2, c0 + (num_units - 1) * g],
    x=[[2, 2, c0]] + [[2, 2, g]] * (num_units - 1),
    num_vars=num_vars,
  )


# name -> make (a fresh, unperturbed instance), z/x event shapes (list of lists = multipart),
# the exact number of trainable variables (tf.Variables + Keras layers' variables).
_CASES = {
  'actnorm': dict(make=lambda: B.ActNorm(3), z=[2, 2, 3], x=[2, 2, 3], num_vars=2),
  'conv1x1': dict(
    make=lambda: B.InvertibleConv1x1(3, seed=tf.constant([1, 2])),
    z=[2, 2, 3],
    x=[2, 2, 3],
    num_vars=1,
  ),
  'affine_coupling_even': dict(
    make=lambda: B.AffineCoupling(4, _coupling_net(4, 1)),
    z=[2, 2, 4],
    x=[2, 2, 4],
    num_vars=_num_coupling_net_vars(),
  ),
  'affine_coupling_odd': dict(
    make=lambda: B.AffineCoupling(5, _coupling_net(5, 2)),
    z=[2, 2, 5],
    x=[2, 2, 5],
    num_vars=_num_coupling_net_vars(),
  ),
  'squeeze_channel_major': dict(
    make=lambda: B.Squeeze('channel_major'), z=[2, 2, 8], x=[4, 4, 2], num_vars=0
  ),
  'squeeze_space_to_depth': dict(
    make=lambda: B.Squeeze('space_to_depth'), z=[2, 2, 8], x=[4, 4, 2], num_vars=0
  ),
  'channel_swap_even': dict(make=lambda: B.ChannelSwap(4), z=[2, 2, 4], x=[2, 2, 4], num_vars=0),
  'channel_swap_odd': dict(make=lambda: B.ChannelSwap(5), z=[2, 2, 5], x=[2, 2, 5], num_vars=0),
  'glow_step': dict(
    make=lambda: _glow_step(4, 4), z=[2, 2, 4], x=[2, 2, 4], num_vars=3 + _num_coupling_net_vars()
  ),
  'cross_unit': dict(
    make=lambda: B.CrossUnitCoupling(2, CrossUnitNetwork(3, 2, seeds=Seeds(6))),
    z=[[2, 2, 3], [2, 2, 2]],
    x=[[2, 2, 3], [2, 2, 2]],
    num_vars=4,
  ),
  'dense_block_1unit': _dense_block_case(1),
  'dense_block_2units': _dense_block_case(2),
  'dense_block_3units': _dense_block_case(3),
  'dense_block_3units_include_previous': _dense_block_case(3, include_previous=True),
  'dense_block_3units_no_couplings': _dense_block_case(3, use_couplings=False),
  'transition_channel_major': dict(
    make=lambda: B.Transition('channel_major'),
    z=[[2, 2, 4], [2, 2, 4]],
    x=[4, 4, 2],
    num_vars=0,
  ),
  'transition_space_to_depth': dict(
    make=lambda: B.Transition('space_to_depth'),
    z=[[2, 2, 4], [2, 2, 4]],
    x=[4, 4, 2],
    num_vars=0,
  ),
}

_CASE_PARAMS = [(name, name) for name in _CASES]

_BUILT = {}


def _perturbed(name):
  """A perturbed instance of case `name`, built once per test session (construction is slow)."""
  if name not in _BUILT:
    bijector = _CASES[name]['make']()
    seed = zlib.crc32(name.encode()) % 1000  # deterministic whatever the test order
    lib.perturb_variables(lib.all_trainable_variables(bijector), seed=seed, scale=0.2)
    _BUILT[name] = bijector
  return _BUILT[name]


def _inputs(name, batch_shape=(3,), dtype=tf.float32, seed=0):
  case = _CASES[name]
  z = lib.random_structure(case['z'], batch_shape, seed=seed, dtype=dtype)
  x = lib.random_structure(case['x'], batch_shape, seed=seed + 1, dtype=dtype)
  return z, x


def _event_size(shapes):
  shapes = shapes if isinstance(shapes[0], list) else [shapes]
  return sum(int(np.prod(s)) for s in shapes)


# -------------------------------------------------------------------------------------------------
# The contract, for every bijector.


class BijectorContractTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(*_CASE_PARAMS)
  def test_round_trip(self, name):
    bijector = _perturbed(name)
    z, x = _inputs(name)
    lib.assert_round_trip(self, bijector, z, x, atol=_ROUND_TRIP_ATOL)

  @parameterized.named_parameters(
    *[
      (f'{name}_batch{"x".join(map(str, b)) or "scalar"}', name, b)
      for name in _CASES
      for b in ((), (1,), (3,))
    ]
  )
  def test_shapes_and_log_det_consistency(self, name, batch_shape):
    bijector = _perturbed(name)
    z, _ = _inputs(name, batch_shape)

    def shapes(case_shapes):
      case_shapes = case_shapes if isinstance(case_shapes[0], list) else [case_shapes]
      return [list(batch_shape) + s for s in case_shapes]

    if batch_shape != (3,):  # shapes and fldj == -ildj only (the full check runs at [3])
      x, fldj = bijector.forward_and_log_det(z)
      z_back, ildj = bijector.inverse_and_log_det(x)
      self.assertEqual([t.shape.as_list() for t in tf.nest.flatten(x)], shapes(_CASES[name]['x']))
      self.assertEqual(
        [t.shape.as_list() for t in tf.nest.flatten(z_back)], shapes(_CASES[name]['z'])
      )
      self.assertEqual(fldj.shape, batch_shape)
      self.assertEqual(ildj.shape, batch_shape)
      self.assertAllClose(fldj, -ildj, atol=_LOG_DET_ATOL, rtol=1e-5)
      public = bijector.forward_log_det_jacobian(z, event_ndims=bijector.forward_min_event_ndims)
      self.assertAllClose(public, fldj, atol=_LOG_DET_ATOL, rtol=1e-5)
      return
    lib.assert_log_det_consistent(self, bijector, z, list(batch_shape), atol=_LOG_DET_ATOL)

  @parameterized.named_parameters(*_CASE_PARAMS)
  def test_log_det_matches_float64_jacobian(self, name):
    bijector = _perturbed(name)
    z, x = _inputs(name, batch_shape=(), dtype=tf.float64)
    self.assertLessEqual(_event_size(_CASES[name]['x']), 128)
    # Multi-unit dense blocks: the density direction only (the forward direction is tied to it by
    # the round-trip and fldj == -ildj tests), to keep the suite fast.
    multi_unit = name.startswith('dense_block') and name != 'dense_block_1unit'
    directions = ('inverse',) if multi_unit else ('forward', 'inverse')
    lib.assert_log_det_matches_jacobian(
      self, bijector, z, x, atol=_JACOBIAN_ATOL, rtol=1e-6, directions=directions
    )
    # The bijectors follow the input dtype: float64 in, float64 out (log-dets included).
    for t in tf.nest.flatten([bijector.forward_and_log_det(z), bijector.inverse_and_log_det(x)]):
      self.assertEqual(t.dtype, tf.float64)

  @parameterized.named_parameters(*_CASE_PARAMS)
  def test_memo_answers_the_keyword_arguments_asked(self, name):
    # The log-det remembered from a pass is only reused for the same keyword arguments: e.g.
    # `inverse(x, training=True)` then `inverse_log_det_jacobian(x, training=False)` must be the
    # inference-mode value (the batch norms differ). Every combination, both directions.
    uses_data_init = name.startswith(('glow_step', 'dense_block'))
    if uses_data_init:  # data_init re-initialises ActNorm: a private instance
      bijector = _CASES[name]['make']()
      lib.perturb_variables(lib.all_trainable_variables(bijector), seed=7, scale=0.2)
    else:
      bijector = _perturbed(name)
    combos = [{}, {'training': False}, {'training': True}]
    if uses_data_init:
      combos.append({'training': True, 'data_init': True})
    z, x = _inputs(name, batch_shape=(3,))
    for passed, asked in itertools.product(combos, combos):
      with self.subTest(passed=passed, asked=asked):
        fresh_x = tf.nest.map_structure(tf.identity, x)
        bijector.inverse(fresh_x, **passed)
        got = bijector.inverse_log_det_jacobian(
          fresh_x, event_ndims=bijector.inverse_min_event_ndims, **asked
        )
        want = bijector.inverse_and_log_det(fresh_x, **asked)[1]
        self.assertAllClose(got, want, atol=_LOG_DET_ATOL, rtol=1e-5)
        if 'data_init' in passed or 'data_init' in asked:
          continue  # the sampling direction has no data_init
        fresh_z = tf.nest.map_structure(tf.identity, z)
        bijector.forward(fresh_z, **passed)
        got = bijector.forward_log_det_jacobian(
          fresh_z, event_ndims=bijector.forward_min_event_ndims, **asked
        )
        want = bijector.forward_and_log_det(fresh_z, **asked)[1]
        self.assertAllClose(got, want, atol=_LOG_DET_ATOL, rtol=1e-5)

  @parameterized.named_parameters(('glow_step', 'glow_step'))
  def test_batch_row_jacobian_equals_tape_jacobian(self, name):
    # Validates the one-pass Jacobian (batch rows) used above against tf.GradientTape.jacobian.
    bijector = _perturbed(name)
    _, x = _inputs(name, batch_shape=(), dtype=tf.float64)
    fn = bijector.inverse_and_log_det
    self.assertAllClose(
      lib.jacobian(fn, x, use_batch_rows=True),
      lib.jacobian(fn, x, use_batch_rows=False),
      atol=1e-6,
    )

  @parameterized.named_parameters(*_CASE_PARAMS)
  def test_traces_with_unknown_batch(self, name):
    bijector = _perturbed(name)
    z, x = _inputs(name, batch_shape=(2,))
    lib.assert_traces_with_unknown_batch(self, bijector, z, x, atol=_ROUND_TRIP_ATOL)

  @parameterized.named_parameters(*_CASE_PARAMS)
  def test_variables_and_gradients(self, name):
    bijector = _perturbed(name)
    variables = lib.all_trainable_variables(bijector)
    self.assertLen(variables, _CASES[name]['num_vars'])
    if not variables:
      self.assertEmpty(bijector.trainable_variables)
      return
    z, x = _inputs(name, batch_shape=(4,))
    lib.assert_all_variables_get_gradients(self, bijector, z, x, variables)

  @parameterized.named_parameters(*_CASE_PARAMS)
  def test_invert_and_transformed_distribution(self, name):
    bijector = _perturbed(name)
    z, x = _inputs(name, batch_shape=(2,))
    inverted = tfb.Invert(bijector)
    want_z, ildj = bijector.inverse_and_log_det(x)
    for got, want in zip(tf.nest.flatten(inverted.forward(x)), tf.nest.flatten(want_z)):
      self.assertAllClose(got, want, atol=1e-5)
    self.assertAllClose(
      inverted.forward_log_det_jacobian(x, event_ndims=bijector.inverse_min_event_ndims),
      ildj,
      atol=1e-5,
    )
    # p(x) = N(inverse(x); 0, I) * |det d inverse / dx|.
    z_shapes = _CASES[name]['z']
    if isinstance(z_shapes[0], list):
      base = tfd.JointDistributionSequential(
        [tfd.Sample(tfd.Normal(0.0, 1.0), sample_shape=s) for s in z_shapes]
      )
      base_log_prob = base.log_prob(want_z)
    else:
      base = tfd.Sample(tfd.Normal(0.0, 1.0), sample_shape=z_shapes)
      base_log_prob = base.log_prob(want_z)
    dist = tfd.TransformedDistribution(base, bijector)
    self.assertAllClose(dist.log_prob(x), base_log_prob + ildj, atol=1e-4, rtol=1e-5)
    samples = dist.sample(3, seed=tf.constant([1, 2]))
    want_x = _CASES[name]['x']
    want_x = want_x if isinstance(want_x[0], list) else [want_x]
    self.assertEqual(
      [t.shape.as_list() for t in tf.nest.flatten(samples)], [[3] + s for s in want_x]
    )
    self.assertTrue(all(np.all(np.isfinite(t.numpy())) for t in tf.nest.flatten(samples)))


# -------------------------------------------------------------------------------------------------
# Per-bijector behaviour.


def _std_normal_log_prob(t):
  return tf.reduce_sum(-0.5 * tf.square(t) - 0.5 * np.log(2 * np.pi), axis=[-3, -2, -1])


class ActNormTest(tf.test.TestCase, parameterized.TestCase):
  def test_initialize_gives_zero_mean_unit_std(self):
    bijector = B.ActNorm(3)
    self.assertFalse(bool(bijector.initialized.numpy()))
    x = tf.random.stateless_normal([5, 4, 4, 3], seed=[0, 1]) * [1.0, 3.0, 0.2] + [2.0, -1.0, 0.5]
    bijector.initialize(x)
    self.assertTrue(bool(bijector.initialized.numpy()))
    z = bijector.inverse(x).numpy().reshape([-1, 3])
    self.assertAllClose(z.mean(axis=0), np.zeros(3), atol=1e-5)
    self.assertAllClose(z.std(axis=0, ddof=1), np.ones(3), atol=1e-4)  # unbiased, as official

  def test_log_det_closed_form(self):
    bijector = B.ActNorm(3)
    bijector.log_scale.assign([0.1, -0.3, 0.7])
    z = tf.ones([2, 4, 5, 3])
    self.assertAllClose(bijector.forward_and_log_det(z)[1], [4 * 5 * 0.5] * 2, atol=1e-5)

  def test_identity_at_construction(self):
    bijector = B.ActNorm(3)
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[0, 2])
    z, ldj = bijector.inverse_and_log_det(x)
    self.assertAllClose(z, x)
    self.assertAllClose(ldj, tf.zeros([2]))

  def test_instances_do_not_share_tfp_cache(self):
    first, second = B.ActNorm(3), B.ActNorm(3)
    second.shift.assign([1.0, 2.0, 3.0])
    self.assertNotEqual(first, second)  # TFP's cache is shared between equal bijectors
    z = tf.zeros([2, 2, 2, 3])
    # Hold both results: TFP's cache entry lives as long as the first output tensor.
    x_first = first.forward(z)
    x_second = second.forward(z)
    self.assertAllClose(x_first, tf.zeros([2, 2, 2, 3]))
    self.assertAllClose(x_second, tf.ones([2, 2, 2, 1]) * [1.0, 2.0, 3.0])

  @parameterized.named_parameters(
    ('zero', 0),
    ('negative', -2),
    ('fraction', 2.5),
    ('numpy_zero', np.int64(0)),
    ('tensor_fraction', tf.constant(3.5)),
  )
  def test_bad_channels_raise(self, channels):
    with self.assertRaisesRegex(ValueError, '`channels`'):
      B.ActNorm(channels)
    with self.assertRaisesRegex(ValueError, '`channels`'):
      B.ChannelSwap(channels)
    with self.assertRaisesRegex(ValueError, '`growth_rate`'):
      B.CrossUnitCoupling(channels, CrossUnitNetwork(3, 2, seeds=Seeds(0)))

  def test_integral_numpy_and_tensor_channels_are_python_ints(self):
    self.assertEqual(B.ActNorm(np.int64(3)).channels, 3)
    self.assertIsInstance(B.ActNorm(tf.constant(3)).channels, int)
    self.assertEqual(B.InvertibleConv1x1(3.0).channels, 3)


class InvertibleConv1x1Test(tf.test.TestCase, parameterized.TestCase):
  def _kernel(self):
    return tf.constant([[1.0, 2.0, 0.5], [0.0, -1.5, 1.0], [0.3, 0.2, 2.0]])

  def test_matches_scale_matvec_lu(self):
    bijector = B.InvertibleConv1x1(3)
    bijector.kernel.assign(self._kernel())
    lower_upper, permutation = tf.linalg.lu(self._kernel())
    reference = tfb.ScaleMatvecLU(lower_upper, permutation, validate_args=True)
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[1, 1])
    # Density direction z = W x per pixel == ScaleMatvecLU's forward.
    self.assertAllClose(bijector.inverse(x), reference.forward(x), atol=1e-5)
    self.assertAllClose(bijector.forward(x), reference.inverse(x), atol=1e-5)
    self.assertAllClose(
      bijector.inverse_log_det_jacobian(x, event_ndims=3),
      reference.forward_log_det_jacobian(x, event_ndims=3) * tf.ones([2]),
      atol=1e-5,
    )

  def test_matches_plain_matmul(self):
    bijector = B.InvertibleConv1x1(3)
    bijector.kernel.assign(self._kernel())
    x = np.random.default_rng(0).normal(size=[2, 4, 4, 3]).astype(np.float32)
    want = np.einsum('oi,bhwi->bhwo', self._kernel().numpy(), x)
    z, ldj = bijector.inverse_and_log_det(tf.constant(x))
    self.assertAllClose(z, want, atol=1e-5)
    self.assertAllClose(ldj, [16 * np.log(abs(np.linalg.det(self._kernel().numpy())))] * 2)

  def test_log_abs_det_slogdet_and_xla_qr_paths_agree(self):
    from tf_denseflow import xla
    from tf_denseflow.bijectors.conv1x1 import log_abs_det

    w = tf.constant(np.random.default_rng(3).normal(size=(7, 7)), tf.float64)
    want_value = np.linalg.slogdet(w.numpy())[1]
    want_grad = np.linalg.inv(w.numpy()).T

    def value_and_grad(matrix):
      with tf.GradientTape() as tape:
        tape.watch(matrix)
        value = log_abs_det(matrix)
      return value, tape.gradient(value, matrix)

    for jit in (False, True):
      # The XLA path is chosen by the compiling code (xla.jit traces under xla.compatible()).
      fn = xla.jit(value_and_grad) if jit else tf.function(value_and_grad)
      graph_ops = {op.type for op in fn.get_concrete_function(w).graph.get_operations()}
      self.assertEqual('Qr' in graph_ops, jit)
      value, grad = fn(w)
      self.assertAllClose(value, want_value, rtol=1e-10)
      self.assertAllClose(grad, want_grad, rtol=1e-8)

  def test_init_is_orthogonal_and_seeded(self):
    a = B.InvertibleConv1x1(5, seed=tf.constant([3, 4]))
    b = B.InvertibleConv1x1(5, seed=tf.constant([3, 4]))
    c = B.InvertibleConv1x1(5, seed=tf.constant([3, 5]))
    self.assertAllClose(tf.matmul(a.kernel, a.kernel, transpose_b=True), tf.eye(5), atol=1e-5)
    self.assertAllEqual(a.kernel, b.kernel)
    self.assertNotAllClose(a.kernel, c.kernel)
    self.assertAllClose(a.inverse_and_log_det(tf.ones([1, 2, 2, 5]))[1], [0.0], atol=1e-5)

  def test_instances_do_not_share_tfp_cache(self):
    first, second = B.InvertibleConv1x1(3), B.InvertibleConv1x1(3)
    second.kernel.assign(self._kernel())
    self.assertNotEqual(first, second)
    x = tf.ones([1, 2, 2, 3])
    z_first = first.inverse(x)
    z_second = second.inverse(x)
    self.assertNotAllClose(z_first, z_second)

  @parameterized.named_parameters(('zero', 0), ('negative', -1))
  def test_bad_channels_raise(self, channels):
    with self.assertRaisesRegex(ValueError, 'channels'):
      B.InvertibleConv1x1(channels)


class AffineCouplingTest(tf.test.TestCase, parameterized.TestCase):
  def test_identity_at_initialisation(self):
    bijector = B.AffineCoupling(5, _coupling_net(5, 7))
    x = tf.random.stateless_normal([2, 4, 4, 5], seed=[2, 1])
    for fn in (bijector.forward_and_log_det, bijector.inverse_and_log_det):
      y, ldj = fn(x)
      self.assertAllEqual(y, x)
      self.assertAllEqual(ldj, tf.zeros([2]))

  def test_first_half_passes_and_log_scale_is_bounded(self):
    bijector = B.AffineCoupling(5, _coupling_net(5, 8))
    lib.perturb_variables(lib.all_trainable_variables(bijector), seed=3, scale=5.0)
    x = tf.random.stateless_normal([2, 4, 4, 5], seed=[2, 2])
    z, ldj = bijector.inverse_and_log_det(x)
    self.assertAllEqual(z[..., :3], x[..., :3])  # ceil(5 / 2) conditioning channels
    self.assertAllLessEqual(tf.abs(ldj), 2.0 * 4 * 4 * 2)  # |2 tanh(s/2)| < 2 per element

  def test_context_is_passed_to_the_conditioner(self):
    bijector = B.AffineCoupling(4, _coupling_net(4, 9, context=3))
    lib.perturb_variables(lib.all_trainable_variables(bijector), seed=4, scale=0.2)
    x = tf.random.stateless_normal([2, 4, 4, 4], seed=[3, 1])
    c1 = tf.random.stateless_normal([2, 4, 4, 3], seed=[3, 2])
    c2 = tf.random.stateless_normal([2, 4, 4, 3], seed=[3, 3])
    z1, _ = bijector.inverse_and_log_det(x, context=c1)
    z2, _ = bijector.inverse_and_log_det(x, context=c2)
    self.assertNotAllClose(z1, z2)
    back, _ = bijector.forward_and_log_det(z1, context=c1)
    self.assertAllClose(back, x, atol=1e-5)
    x64 = tf.cast(x[0], tf.float64)
    c64 = tf.cast(c1[0], tf.float64)
    fn = lambda v: bijector.inverse_and_log_det(v, context=c64)  # noqa: E731
    want = lib.jacobian_log_det(fn, x64, use_batch_rows=False)  # the context is unbatched
    self.assertAllClose(float(fn(x64)[1]), want, atol=1e-6)

  def test_memo_answers_the_context_asked(self):
    bijector = B.AffineCoupling(4, _coupling_net(4, 9, context=3))
    lib.perturb_variables(lib.all_trainable_variables(bijector), seed=4, scale=0.2)
    x = tf.random.stateless_normal([2, 4, 4, 4], seed=[3, 1])
    c1 = tf.random.stateless_normal([2, 4, 4, 3], seed=[3, 2])
    c2 = tf.random.stateless_normal([2, 4, 4, 3], seed=[3, 3])
    bijector.inverse(x, context=c1)
    got = bijector.inverse_log_det_jacobian(x, event_ndims=3, context=c2)
    want = bijector.inverse_and_log_det(x, context=c2)[1]
    self.assertNotAllClose(want, bijector.inverse_and_log_det(x, context=c1)[1])
    self.assertAllClose(got, want, atol=1e-5)

  def test_instances_with_different_networks_do_not_share_tfp_cache(self):
    first = B.AffineCoupling(4, _coupling_net(4, 10))
    second = B.AffineCoupling(4, _coupling_net(4, 11))
    lib.perturb_variables(lib.all_trainable_variables(first), seed=5, scale=0.2)
    lib.perturb_variables(lib.all_trainable_variables(second), seed=6, scale=0.2)
    self.assertNotEqual(first, second)
    x = tf.random.stateless_normal([2, 4, 4, 4], seed=[4, 1])
    z_first = first.inverse(x)  # held, so TFP's cache entry stays alive
    z_second = second.inverse(x)
    self.assertNotAllClose(z_first, z_second)
    z = tf.random.stateless_normal([2, 4, 4, 4], seed=[4, 2])
    x_first = first.forward(z)
    x_second = second.forward(z)
    self.assertNotAllClose(x_first, x_second)

  def test_log_prob_runs_the_conditioner_once(self):
    counter = lib.CountingNetwork(_coupling_net(4, 12))
    bijector = B.AffineCoupling(4, counter)
    lib.perturb_variables(lib.all_trainable_variables(bijector), seed=7, scale=0.2)
    dist = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), [4, 4, 4]), bijector)
    x = tf.random.stateless_normal([2, 4, 4, 4], seed=[5, 1])
    counter.calls = 0
    log_prob = dist.log_prob(x)
    self.assertEqual(counter.calls, 1)
    z, ildj = bijector.inverse_and_log_det(x)
    self.assertAllClose(log_prob, _std_normal_log_prob(z) + ildj, atol=1e-4)

  def test_recompute_grad_gives_the_same_gradients(self):
    plain = B.AffineCoupling(4, _coupling_net(4, 13))
    variables = lib.all_trainable_variables(plain)
    lib.perturb_variables(variables, seed=8, scale=0.2)
    recompute = B.AffineCoupling(4, plain.conditioner, use_recompute_grad=True)
    x = tf.random.stateless_normal([2, 4, 4, 4], seed=[6, 1])
    grads = []
    for bijector in (plain, recompute):
      with tf.GradientTape() as tape:
        z, ldj = bijector.inverse_and_log_det(x, training=True)
        loss = tf.reduce_sum(z) + tf.reduce_sum(ldj)
      grads.append(tape.gradient(loss, variables))
    for a, b in zip(*grads):
      self.assertAllClose(a, b, atol=1e-5)

  @parameterized.named_parameters(('one', 1), ('zero', 0))
  def test_bad_channels_raise(self, channels):
    with self.assertRaisesRegex(ValueError, 'channels'):
      B.AffineCoupling(channels, _coupling_net(2, 0))


class SqueezeTest(tf.test.TestCase, parameterized.TestCase):
  def test_space_to_depth_order_matches_tf(self):
    x = tf.random.stateless_normal([2, 6, 4, 3], seed=[7, 1])
    self.assertAllEqual(B.Squeeze('space_to_depth').inverse(x), tf.nn.space_to_depth(x, 2))
    z = tf.random.stateless_normal([2, 3, 2, 12], seed=[7, 2])
    self.assertAllEqual(B.Squeeze('space_to_depth').forward(z), tf.nn.depth_to_space(z, 2))

  def test_channel_major_order_matches_the_official_formula(self):
    x = np.arange(2 * 6 * 4 * 3, dtype=np.float32).reshape([2, 6, 4, 3])
    want = np.zeros([2, 3, 2, 12], np.float32)
    for h in range(3):
      for w in range(2):
        for c in range(3):
          for i in range(2):
            for j in range(2):
              want[:, h, w, c * 4 + i * 2 + j] = x[:, 2 * h + i, 2 * w + j, c]
    self.assertAllEqual(B.Squeeze('channel_major').inverse(tf.constant(x)), want)
    self.assertAllEqual(B.Squeeze('channel_major').forward(tf.constant(want)), x)

  @parameterized.named_parameters(('channel_major', 'channel_major'), ('tf', 'space_to_depth'))
  def test_event_shapes(self, order):
    bijector = B.Squeeze(order)
    self.assertEqual(bijector.inverse_event_shape([6, 4, 3]), [3, 2, 12])
    self.assertEqual(bijector.forward_event_shape([3, 2, 12]), [6, 4, 3])
    self.assertEqual(bijector.inverse_event_shape([None, 4, 3]).as_list(), [None, 2, 12])
    self.assertAllEqual(bijector.inverse_event_shape_tensor([6, 4, 3]), [3, 2, 12])
    self.assertAllEqual(bijector.forward_event_shape_tensor([3, 2, 12]), [6, 4, 3])
    self.assertEqual(bijector.order, order)

  def test_bad_order_raises(self):
    with self.assertRaisesRegex(ValueError, 'order'):
      B.Squeeze('depth_first')


class ChannelSwapTest(tf.test.TestCase, parameterized.TestCase):
  def test_odd_channels(self):
    x = tf.reshape(tf.range(5, dtype=tf.float32), [1, 1, 1, 5])
    bijector = B.ChannelSwap(5)
    z = bijector.inverse(x)
    self.assertAllEqual(z[0, 0, 0], [3.0, 4.0, 0.0, 1.0, 2.0])  # [a, b] -> [b, a], a = first 3
    self.assertAllEqual(bijector.forward(z), x)

  @parameterized.named_parameters(('zero', 0), ('negative', -4))
  def test_bad_channels_raise(self, channels):
    with self.assertRaisesRegex(ValueError, 'channels'):
      B.ChannelSwap(channels)


class GlowStepTest(tf.test.TestCase, parameterized.TestCase):
  def test_equals_tfp_chain_of_its_parts(self):
    step = _perturbed('glow_step')
    chain = tfb.Chain(step.density_order)  # Chain applies the last bijector first in forward
    z = tf.random.stateless_normal([2, 4, 4, 4], seed=[8, 1])
    x, fldj = step.forward_and_log_det(z)
    self.assertAllClose(chain.forward(z), x, atol=1e-5)
    self.assertAllClose(chain.forward_log_det_jacobian(z, event_ndims=3), fldj, atol=1e-4)
    x2 = tf.random.stateless_normal([2, 4, 4, 4], seed=[8, 2])
    z2, ildj = step.inverse_and_log_det(x2)
    self.assertAllClose(chain.inverse(x2), z2, atol=1e-5)
    self.assertAllClose(chain.inverse_log_det_jacobian(x2, event_ndims=3), ildj, atol=1e-4)

  def test_volume_preserving_at_initialisation(self):
    step = _glow_step(4, 20)
    x = tf.random.stateless_normal([2, 4, 4, 4], seed=[8, 3])
    z, ldj = step.inverse_and_log_det(x)
    self.assertAllClose(ldj, tf.zeros([2]), atol=1e-5)  # ActNorm 0, orthogonal W, zero coupling
    want = step.swap.inverse(step.conv1x1.inverse(x))  # the coupling is the identity
    self.assertAllClose(z, want, atol=1e-6)

  def test_data_init(self):
    step = _glow_step(4, 21)
    x = tf.random.stateless_normal([4, 4, 4, 4], seed=[8, 4]) * 3.0 + 1.0
    step.inverse_and_log_det(x, data_init=True)
    self.assertTrue(bool(step.act_norm.initialized.numpy()))
    h = step.act_norm.inverse(x).numpy().reshape([-1, 4])
    self.assertAllClose(h.mean(0), np.zeros(4), atol=1e-5)

  def test_in_transformed_distribution_with_squeeze(self):
    counter = lib.CountingNetwork(_coupling_net(4, 22))
    step = B.GlowStep(4, counter, conv_seed=tf.constant([2, 2]))
    lib.perturb_variables(lib.all_trainable_variables(step), seed=9, scale=0.2)
    # forward: z [4, 4, 4] -> GlowStep -> unsqueeze -> x [8, 8, 1].
    flow = tfb.Chain([B.Squeeze(), step])
    base = tfd.Sample(tfd.Normal(0.0, 1.0), [4, 4, 4])
    dist = tfd.TransformedDistribution(base, flow)
    self.assertEqual(dist.event_shape, [8, 8, 1])
    samples = dist.sample(3, seed=tf.constant([3, 3]))
    self.assertEqual(samples.shape, [3, 8, 8, 1])
    x = tf.random.stateless_normal([2, 8, 8, 1], seed=[8, 5])
    counter.calls = 0
    log_prob = dist.log_prob(x)
    self.assertEqual(counter.calls, 1)  # the memo: TFP's inverse + ildj share one evaluation
    z, ildj = step.inverse_and_log_det(B.Squeeze().inverse(x))
    self.assertAllClose(log_prob, base.log_prob(z) + ildj, atol=1e-4)
    self.assertTrue(np.all(np.isfinite(dist.log_prob(samples).numpy())))

  def test_instances_do_not_share_tfp_cache(self):
    first, second = _glow_step(4, 23), _glow_step(4, 24)
    lib.perturb_variables(lib.all_trainable_variables(first), seed=10, scale=0.2)
    lib.perturb_variables(lib.all_trainable_variables(second), seed=11, scale=0.2)
    self.assertNotEqual(first, second)
    x = tf.random.stateless_normal([1, 4, 4, 4], seed=[8, 6])
    z_first = first.inverse(x)
    z_second = second.inverse(x)
    self.assertNotAllClose(z_first, z_second)

  @parameterized.named_parameters(('zero', 0), ('one', 1))
  def test_bad_channels_raise(self, channels):
    with self.assertRaisesRegex(ValueError, 'channels'):
      B.GlowStep(channels, _coupling_net(2, 0))


class CrossUnitCouplingTest(tf.test.TestCase, parameterized.TestCase):
  def test_identity_on_noise_at_initialisation(self):
    bijector = B.CrossUnitCoupling(2, CrossUnitNetwork(3, 2, seeds=Seeds(30)))
    h = tf.random.stateless_normal([2, 4, 4, 3], seed=[9, 1])
    noise = tf.random.stateless_normal([2, 4, 4, 2], seed=[9, 2])
    (h_out, eta), ldj = bijector.inverse_and_log_det([h, noise])
    self.assertAllEqual(h_out, h)
    self.assertAllEqual(eta, noise)
    self.assertAllEqual(ldj, tf.zeros([2]))

  def test_affine_formula(self):
    bijector = _perturbed('cross_unit')
    h = tf.random.stateless_normal([2, 4, 4, 3], seed=[9, 3])
    noise = tf.random.stateless_normal([2, 4, 4, 2], seed=[9, 4])
    mu, log_sigma = bijector.mu_and_log_sigma(h)
    self.assertAllLess(tf.abs(log_sigma), 2.0)
    (h_out, eta), ldj = bijector.inverse_and_log_det([h, noise])
    self.assertAllEqual(h_out, h)
    self.assertAllClose(eta, mu + tf.exp(log_sigma) * noise, atol=1e-6)
    self.assertAllClose(ldj, tf.reduce_sum(log_sigma, axis=[1, 2, 3]), atol=1e-5)
    self.assertEqual(bijector.growth_rate, 2)

  def test_event_shapes(self):
    bijector = _perturbed('cross_unit')
    shapes = [tf.TensorShape([4, 4, 3]), tf.TensorShape([4, 4, 2])]
    self.assertEqual(bijector.forward_event_shape(shapes), shapes)
    self.assertEqual(bijector.inverse_event_shape(shapes), shapes)

  @parameterized.named_parameters(('zero', 0), ('negative', -2))
  def test_bad_growth_rate_raises(self, growth):
    with self.assertRaisesRegex(ValueError, 'growth_rate'):
      B.CrossUnitCoupling(growth, CrossUnitNetwork(3, 2))


class DenseBlockTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(('1unit', 1, False), ('2units', 2, False), ('3units', 3, True))
  def test_event_shapes(self, num_units, include_previous):
    block = _perturbed(
      f'dense_block_{num_units}unit'
      + ('s' if num_units > 1 else '')
      + ('_include_previous' if include_previous else '')
    )
    z_event = [4, 4, 3 + 2 * (num_units - 1)]
    x_events = [[4, 4, 3]] + [[4, 4, 2]] * (num_units - 1)
    self.assertEqual(block.out_channels, z_event[-1])
    self.assertEqual(block.in_channels, 3)
    self.assertEqual(block.num_units, num_units)
    self.assertEqual([s.as_list() for s in block.forward_event_shape(z_event)], x_events)
    self.assertEqual(block.inverse_event_shape(x_events).as_list(), z_event)
    self.assertEqual(
      [t.numpy().tolist() for t in block.forward_event_shape_tensor(z_event)], x_events
    )
    self.assertAllEqual(block.inverse_event_shape_tensor(x_events), z_event)
    self.assertEqual(block.forward_dtype(tf.float32), [tf.float32] * num_units)
    self.assertEqual(block.inverse_dtype([tf.float32] * num_units), tf.float32)

  @parameterized.named_parameters(
    ('2units', 'dense_block_2units'),
    ('3units_include_previous', 'dense_block_3units_include_previous'),
  )
  def test_sample_data_equals_first_part_of_forward(self, name):
    block = _perturbed(name)
    z, _ = _inputs(name, (2,))
    self.assertAllClose(block.sample_data(z), block.forward(z)[0], atol=1e-6)

  def test_one_unit_is_the_chain_of_its_steps(self):
    block = _dense_block(1, steps_per_unit=2, seed=3)
    lib.perturb_variables(lib.all_trainable_variables(block), seed=12, scale=0.2)
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[10, 1])
    z, ldj = block.inverse_and_log_det([x])
    chain = tfb.Chain(block.units[0])  # density order: units[0][0] first
    self.assertAllClose(z, chain.inverse(x), atol=1e-5)
    self.assertAllClose(ldj, chain.inverse_log_det_jacobian(x, event_ndims=3), atol=1e-4)

  @parameterized.named_parameters(('official', False), ('include_previous', True))
  def test_matches_the_documented_recursion(self, include_previous):
    block = _perturbed('dense_block_3units' + ('_include_previous' if include_previous else ''))
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[10, 2])
    n1 = tf.random.stateless_normal([2, 4, 4, 2], seed=[10, 3])
    n2 = tf.random.stateless_normal([2, 4, 4, 2], seed=[10, 4])

    def unit(i, h):
      return block.units[i][0].inverse_and_log_det(h)

    y0, ld = unit(0, x)
    cond1 = tf.concat([x, y0], -1) if include_previous else x
    (_, eta1), ls1 = block.couplings[0].inverse_and_log_det([cond1, n1])
    y1, ld1 = unit(1, tf.concat([y0, eta1], -1))
    cond2 = tf.concat([x, y0, y1] if include_previous else [x, y0], -1)
    (_, eta2), ls2 = block.couplings[1].inverse_and_log_det([cond2, n2])
    y2, ld2 = unit(2, tf.concat([y1, eta2], -1))
    z, ldj = block.inverse_and_log_det([x, n1, n2])
    self.assertAllClose(z, y2, atol=1e-6)
    self.assertAllClose(ldj, ld + ls1 + ld1 + ls2 + ld2, atol=1e-5)

  def test_noise_passes_unchanged_at_initialisation(self):
    block = _dense_block(2, seed=4)
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[10, 5])
    noise = tf.random.stateless_normal([2, 4, 4, 2], seed=[10, 6])
    (_, eta), ld = block.couplings[0].inverse_and_log_det([x, noise])
    self.assertAllEqual(eta, noise)
    _, ldj = block.inverse_and_log_det([x, noise])
    self.assertAllClose(ldj, tf.zeros([2]), atol=1e-5)  # orthogonal convs, zero-init nets

  def test_joint_distribution_and_elbo_bookkeeping(self):
    block = _perturbed('dense_block_2units')
    base = tfd.Sample(tfd.Normal(0.0, 1.0), [4, 4, 5])
    joint = tfd.TransformedDistribution(base, block)
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[10, 7])
    noise = tf.random.stateless_normal([2, 4, 4, 2], seed=[10, 8])
    z, ildj = block.inverse_and_log_det([x, noise])
    self.assertAllClose(joint.log_prob([x, noise]), base.log_prob(z) + ildj, atol=1e-4)
    samples = joint.sample(2, seed=tf.constant([4, 4]))
    self.assertEqual([s.shape.as_list() for s in samples], [[2, 4, 4, 3], [2, 4, 4, 2]])

  def test_log_prob_runs_each_network_once(self):
    steps = [
      [B.GlowStep(3 + 2 * i, lib.CountingNetwork(_coupling_net(3 + 2 * i, 40 + i, False)))]
      for i in range(2)
    ]
    coupling = B.CrossUnitCoupling(2, lib.CountingNetwork(CrossUnitNetwork(3, 2)))
    block = B.DenseBlock(steps, [coupling], 3, 2)
    lib.perturb_variables(lib.all_trainable_variables(block), seed=13, scale=0.2)
    joint = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), [4, 4, 5]), block)
    counters = [s[0].coupling.conditioner for s in steps] + [coupling.network]
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[10, 9])
    noise = tf.random.stateless_normal([2, 4, 4, 2], seed=[10, 10])
    for c in counters:
      c.calls = 0
    joint.log_prob([x, noise])
    self.assertEqual([c.calls for c in counters], [1, 1, 1])

  def test_wrong_conditioning_width_fails(self):
    # g_1 built for include_previous=False (input x only) cannot serve include_previous=True.
    steps = [[_glow_step(3 + 2 * i, 50 + i, False)] for i in range(2)]
    coupling = B.CrossUnitCoupling(2, CrossUnitNetwork(3, 2))
    block = B.DenseBlock(steps, [coupling], 3, 2, include_previous=True)
    with self.assertRaises((ValueError, tf.errors.InvalidArgumentError)):
      block.inverse([tf.zeros([1, 4, 4, 3]), tf.zeros([1, 4, 4, 2])])

  @parameterized.named_parameters(
    ('no_units', 0, 2, None, 'units'),
    ('zero_growth_rate', 2, 0, None, 'growth_rate'),
    ('too_many_couplings', 2, 2, [None, None], 'couplings'),
    ('too_few_couplings', 3, 2, [None], 'couplings'),
  )
  def test_bad_arguments_raise(self, num_units, growth, couplings, pattern):
    units = [[B.ChannelSwap(3 + i * max(growth, 1))] for i in range(num_units)]
    with self.assertRaisesRegex(ValueError, pattern):
      B.DenseBlock(units, couplings, 3, growth)


class TransitionTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(('channel_major', 'channel_major'), ('tf', 'space_to_depth'))
  def test_is_a_split_squeeze(self, order):
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[11, 1])
    keep, out = B.Transition(order).inverse(x)
    squeezed = B.Squeeze(order).inverse(x)
    self.assertAllEqual(keep, squeezed[..., :6])
    self.assertAllEqual(out, squeezed[..., 6:])

  def test_event_shapes_and_dtypes(self):
    bijector = B.Transition()
    self.assertEqual(
      [s.as_list() for s in bijector.inverse_event_shape([8, 8, 5])], [[4, 4, 10]] * 2
    )
    self.assertEqual(bijector.forward_event_shape([[4, 4, 10], [4, 4, 10]]).as_list(), [8, 8, 5])
    self.assertEqual(
      [t.numpy().tolist() for t in bijector.inverse_event_shape_tensor([8, 8, 5])],
      [[4, 4, 10]] * 2,
    )
    self.assertAllEqual(bijector.forward_event_shape_tensor([[4, 4, 10], [4, 4, 10]]), [8, 8, 5])
    self.assertEqual(bijector.inverse_dtype(tf.float32), [tf.float32, tf.float32])
    self.assertEqual(bijector.forward_dtype([tf.float32, tf.float32]), tf.float32)

  def test_bad_order_raises(self):
    with self.assertRaisesRegex(ValueError, 'order'):
      B.Transition('bad')


class CompositionTest(tf.test.TestCase):
  def test_chain_of_multipart_bijectors(self):
    # forward: [z_keep, z_out] ([2, 2, 10] each) -> Transition -> [4, 4, 5] -> DenseBlock -> [x, noise].
    block = _perturbed('dense_block_2units')
    flow = tfb.Chain([block, B.Transition()])
    z = [
      tf.random.stateless_normal([2, 2, 2, 10], seed=[12, 1]),
      tf.random.stateless_normal([2, 2, 2, 10], seed=[12, 4]),
    ]
    x = flow.forward(z)
    self.assertEqual([t.shape.as_list() for t in x], [[2, 4, 4, 3], [2, 4, 4, 2]])
    for got, want in zip(flow.inverse(x), z):
      self.assertAllClose(got, want, atol=1e-4)
    want_fldj = block.forward_and_log_det(B.Transition().forward(z))[1]
    self.assertAllClose(flow.forward_log_det_jacobian(z, event_ndims=[3, 3]), want_fldj, atol=1e-4)
    self.assertAllClose(flow.inverse_log_det_jacobian(x, event_ndims=[3, 3]), -want_fldj, atol=1e-4)
    base = tfd.JointDistributionSequential([tfd.Sample(tfd.Normal(0.0, 1.0), [2, 2, 10])] * 2)
    dist = tfd.TransformedDistribution(base, flow)
    self.assertAllClose(dist.log_prob(x), base.log_prob(z) - want_fldj, atol=1e-3)

  def test_memo_is_keyed_by_tensor_identity(self):
    bijector = _perturbed('affine_coupling_even')
    x1 = tf.random.stateless_normal([2, 4, 4, 4], seed=[12, 2])
    x2 = tf.random.stateless_normal([2, 4, 4, 4], seed=[12, 3])
    bijector.inverse(x1)
    bijector.inverse(x2)
    self.assertAllClose(
      bijector.inverse_log_det_jacobian(x1, event_ndims=3), bijector.inverse_and_log_det(x1)[1]
    )
    self.assertAllClose(
      bijector.inverse_log_det_jacobian(x2, event_ndims=3), bijector.inverse_and_log_det(x2)[1]
    )


if __name__ == '__main__':
  tf.test.main()
