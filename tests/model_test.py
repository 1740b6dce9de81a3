"""Tests for tf_denseflow.model (DenseFlow) and tf_denseflow.flow (DenseFlowBijector).

Two tiny models: `_small_config()` (8x8x1, 2 blocks, 3 + 2 units, variational dequantization), on
which the log-det over the joint (x, noise) space is checked against a float64 autodiff Jacobian
(64 + 72 = 136 dimensions), and the golden `tiny` preset (16x16x3, 3 blocks), which carries the
likelihood bookkeeping tests. Zero-initialised weights (coupling/cross-unit/dequantization output
convs, ActNorm, the learned base) are perturbed, so no part of the flow is the identity.
"""

import math

import flow_testlib as lib
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from absl.testing import parameterized

import tf_denseflow as tdf

tfd = tfp.distributions

_LOG_256 = math.log(256.0)


def _small_config(**overrides):
  kwargs = dict(
    image_shape=(8, 8, 1),
    units_per_block=(3, 2),
    steps_per_unit=(1, 1),
    coupling_channels=(4, 4),
    attention_landmarks=2,
  )
  kwargs.update(overrides)
  return tdf.DenseFlowConfig.tiny(**kwargs)


def _images(config, batch, seed=0):
  return np.random.default_rng(seed).integers(0, 256, [batch, *config.image_shape], dtype=np.uint8)


def _perturb_zero_variables(model, seed=0, scale=0.1):
  """Adds noise to every all-zero trainable variable (zero-init convs, ActNorm, base, biases)."""
  zero = [v for v in model.trainable_variables if not np.any(v.numpy())]
  lib.perturb_variables(zero, seed=seed, scale=scale)
  return zero


def _initialized_perturbed(config, seed=0):
  model = tdf.DenseFlow(config, seed=seed)
  model.initialize(_images(config, 8, seed=100 + seed))
  _perturb_zero_variables(model, seed=seed)
  return model


def _std_normal_log_prob(t):
  return tf.reduce_sum(-0.5 * tf.square(t) - 0.5 * math.log(2 * math.pi), axis=[-3, -2, -1])


def _joint_sample(config, batch, seed):
  """Data-side values: x in (0, 1) and N(0, I) noise, as the model's density path sees them."""
  x = tf.random.stateless_uniform([batch, *config.image_shape], seed=[seed, 0])
  noise = [
    tf.random.stateless_normal([batch, *s], seed=[seed, k + 1])
    for k, s in enumerate(config.noise_shapes())
  ]
  return [x] + noise


# -------------------------------------------------------------------------------------------------
# The flow as one bijector.


class DenseFlowBijectorTest(tf.test.TestCase, parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = _small_config()
    cls.model = _initialized_perturbed(cls.config, seed=1)

  def test_config_keeps_the_jacobian_small(self):
    dims = self.config.num_dims + sum(int(np.prod(s)) for s in self.config.noise_shapes())
    latent_dims = sum(int(np.prod(s)) for s in self.config.latent_shapes())
    self.assertEqual(dims, 136)
    self.assertEqual(latent_dims, dims)

  def test_log_det_matches_float64_jacobian_over_x_and_noise(self):
    bijector = self.model.bijector
    parts = lib.cast_structure(_joint_sample(self.config, 1, seed=2), tf.float64)
    parts = [p[0] for p in parts]  # unbatched: the Jacobian of the flattened [x, noise...] map
    want = lib.jacobian_log_det(bijector.inverse_and_log_det, parts)
    latents, log_det = bijector.inverse_and_log_det([p[None] for p in parts])
    self.assertEqual(log_det.dtype, tf.float64)
    self.assertAllClose(float(log_det[0]), want, atol=1e-6, rtol=1e-8)
    self.assertGreater(abs(want), 1.0)  # the perturbed flow is far from volume preserving
    # The sampling direction's log-det is its negative at the image of those latents.
    _, fldj = bijector.forward_and_log_det(latents)
    self.assertAllClose(fldj, -log_det, atol=1e-6)

  def test_round_trips(self):
    bijector = self.model.bijector
    latents = [
      tf.random.stateless_normal([3, *s], seed=[3, k])
      for k, s in enumerate(self.config.latent_shapes())
    ]
    parts, fldj = bijector.forward_and_log_det(latents)
    back, ildj = bijector.inverse_and_log_det(parts)
    for got, want in zip(back, latents):
      self.assertAllClose(got, want, atol=1e-4)
    self.assertAllClose(fldj, -ildj, atol=1e-3)
    data = _joint_sample(self.config, 3, seed=4)
    z, _ = bijector.inverse_and_log_det(data)
    again, _ = bijector.forward_and_log_det(z)
    for got, want in zip(again, data):
      self.assertAllClose(got, want, atol=1e-4)
    # TFP's public methods.
    public = bijector.forward(bijector.inverse([tf.identity(t) for t in data]))
    for got, want in zip(public, data):
      self.assertAllClose(got, want, atol=1e-4)

  def test_sample_data_is_the_image_part_of_forward(self):
    latents = [
      tf.random.stateless_normal([2, *s], seed=[5, k])
      for k, s in enumerate(self.config.latent_shapes())
    ]
    self.assertAllClose(
      self.model.bijector.sample_data(latents), self.model.bijector.forward(latents)[0], atol=1e-6
    )

  def test_event_shapes_and_dtypes(self):
    bijector = self.model.bijector
    cfg = self.config
    data_shapes = [list(cfg.image_shape)] + [list(s) for s in cfg.noise_shapes()]
    latent_shapes = [list(s) for s in cfg.latent_shapes()]
    self.assertEqual(data_shapes, [[8, 8, 1], [4, 4, 2], [4, 4, 2], [2, 2, 2]])
    self.assertEqual(latent_shapes, [[2, 2, 16], [2, 2, 18]])
    self.assertEqual(
      [s.as_list() for s in bijector.forward_event_shape(latent_shapes)], data_shapes
    )
    self.assertEqual(
      [s.as_list() for s in bijector.inverse_event_shape(data_shapes)], latent_shapes
    )
    self.assertEqual(
      [t.numpy().tolist() for t in bijector.forward_event_shape_tensor(latent_shapes)], data_shapes
    )
    self.assertEqual(
      [t.numpy().tolist() for t in bijector.inverse_event_shape_tensor(data_shapes)], latent_shapes
    )
    self.assertEqual(bijector.forward_dtype([tf.float32] * 2), [tf.float32] * 4)
    self.assertEqual(bijector.inverse_dtype([tf.float32] * 4), [tf.float32] * 2)
    joint = self.model.joint_distribution
    self.assertEqual([s.as_list() for s in joint.event_shape], data_shapes)

  def test_traces_with_unknown_batch(self):
    # The density direction through `elbo` (dequantization included), the sampling direction
    # through the bijector's public forward + fldj (noise recovery included).
    spec = tf.TensorSpec([None, *self.config.image_shape], tf.uint8)
    elbo = tf.function(self.model.elbo, input_signature=[spec, tf.TensorSpec([2], tf.int64)])
    images = _images(self.config, 3, seed=10)
    seed = tf.constant([3, 3], tf.int64)
    self.assertAllClose(elbo(images, seed), self.model.elbo(images, seed), atol=1e-3)
    self.assertEqual(elbo(images[:1], seed).shape, [1])  # the same trace, another batch size
    self.assertEqual(elbo.experimental_get_tracing_count(), 1)

    bijector = self.model.bijector
    latent_specs = [tf.TensorSpec([None, *s], tf.float32) for s in self.config.latent_shapes()]

    @tf.function(input_signature=[latent_specs])
    def forward(latents):
      parts = bijector.forward(latents)
      return parts, bijector.forward_log_det_jacobian(latents, event_ndims=[3, 3])

    latents = [
      tf.random.stateless_normal([2, *s], seed=[6, k])
      for k, s in enumerate(self.config.latent_shapes())
    ]
    parts, fldj = forward(latents)
    want_parts, want_fldj = bijector.forward_and_log_det(latents)
    for got, want in zip(parts, want_parts):
      self.assertAllClose(got, want, atol=1e-4)
    self.assertAllClose(fldj, want_fldj, atol=1e-3)

  def test_joint_distribution_log_prob(self):
    data = _joint_sample(self.config, 3, seed=8)
    latents, ildj = self.model.bijector.inverse_and_log_det(data)
    want = self.model.base_distribution.log_prob(latents) + ildj
    want_by_hand = tf.add_n([_std_normal_log_prob(z) for z in latents]) + ildj
    self.assertAllClose(self.model.joint_distribution.log_prob(data), want, atol=1e-3, rtol=1e-6)
    self.assertAllClose(want, want_by_hand, atol=1e-3, rtol=1e-6)
    samples = self.model.joint_distribution.sample(2, seed=tf.constant([1, 1]))
    self.assertEqual(
      [s.shape.as_list() for s in samples], [[2, 8, 8, 1], [2, 4, 4, 2], [2, 4, 4, 2], [2, 2, 2, 2]]
    )

  def test_dequantization_log_q_matches_float64_jacobian(self):
    # q(u|x) is a flow eps -> u: log q(u|x) = log N(eps; 0, I) - log|det du/deps|.
    dequantizer = self.model.dequantizer
    images = tf.constant(_images(self.config, 1, seed=9))
    eps = tf.random.stateless_normal([1, *dequantizer.noise_shape], seed=[9, 1])
    u, log_q = dequantizer.sample_and_log_prob(images, noise=eps)
    self.assertAllInRange(u, 0.0, 1.0)

    def eps_to_u(e):
      batched = e if e.shape.rank == 4 else e[None]
      tiled = tf.tile(images, [tf.shape(batched)[0], 1, 1, 1])
      u, _ = dequantizer.sample_and_log_prob(tiled, noise=batched)
      return tf.cast(u, tf.float64), None

    log_det = lib.jacobian_log_det(eps_to_u, eps[0])
    want = float(_std_normal_log_prob(eps)[0]) - log_det
    self.assertAllClose(float(log_q[0]), want, atol=1e-3, rtol=1e-5)


# -------------------------------------------------------------------------------------------------
# The model: likelihood bounds, sampling, initialisation, variables.


class DenseFlowTest(tf.test.TestCase, parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = tdf.DenseFlowConfig.tiny()  # 16x16x3, 75,532 parameters
    cls.model = _initialized_perturbed(cls.config, seed=2)
    cls.images = _images(cls.config, 3, seed=11)

  def test_elbo_is_the_sum_of_its_terms(self):
    seed = tf.constant([4, 5], tf.int64)
    terms = self.model.elbo_terms(self.images, seed)
    names = ['dequantization', 'block0', 'noise_block0', 'transition0', 'block1']
    names += ['noise_block1', 'transition1', 'block2', 'noise_block2', 'base']
    self.assertCountEqual(list(terms), names + ['total'])
    for name in names:
      self.assertEqual(terms[name].shape, [3], msg=name)
    self.assertAllClose(terms['total'], tf.add_n([terms[n] for n in names]), rtol=1e-6)
    self.assertAllClose(self.model.elbo(self.images, seed), terms['total'], rtol=1e-6)

  def test_terms_computed_by_hand(self):
    model, cfg = self.model, self.config
    bijector = model.bijector
    eps = tf.random.stateless_normal([3, *model.dequantizer.noise_shape], seed=[12, 0])
    noise = [
      tf.random.stateless_normal([3, *s], seed=[12, k + 1])
      for k, s in enumerate(cfg.noise_shapes())
    ]
    terms = model.elbo_terms(self.images, dequant_noise=eps, noise=noise)
    want = {}

    u, log_q = model.dequantizer.sample_and_log_prob(tf.constant(self.images), noise=eps)
    want['dequantization'] = -cfg.num_dims * _LOG_256 - log_q
    h = bijector.squeeze.inverse((tf.cast(self.images, tf.float32) + u) / 256.0 - 0.5)
    k = 0
    for b, block in enumerate(bijector.blocks):
      # DenseBlock by hand (official: g_i sees [x, y_0 .. y_{i-2}]).
      log_det, noise_term, cond = tf.zeros([3]), tf.zeros([3]), [h]
      y = h
      for i, unit in enumerate(block.units):
        if i > 0:
          mu, log_sigma = block.couplings[i - 1].mu_and_log_sigma(tf.concat(cond, -1))
          eta = mu + tf.exp(log_sigma) * noise[k]
          log_det += tf.reduce_sum(log_sigma, axis=[1, 2, 3])
          noise_term -= _std_normal_log_prob(noise[k])
          k += 1
          cond.append(y)
          y = tf.concat([y, eta], -1)
        for step in unit:
          y, ld = step.inverse_and_log_det(y)
          log_det += ld
      want[f'block{b}'], want[f'noise_block{b}'] = log_det, noise_term
      if b < cfg.num_blocks - 1:
        h, z_out = bijector.transitions[b].inverse(y)
        want[f'transition{b}'] = _std_normal_log_prob(z_out)
      else:
        h = y
    base = bijector.base
    z = (h - base.shift) * tf.exp(-base.log_scale)
    hw = h.shape[1] * h.shape[2]
    want['base'] = _std_normal_log_prob(z) - hw * tf.reduce_sum(base.log_scale)
    self.assertEqual(k, len(noise))
    for name, value in want.items():
      self.assertAllClose(terms[name], value, atol=1e-3, rtol=1e-5, msg=name)
    # Every term carries weight (the perturbed cross-unit couplings included).
    for name in ('block0', 'block1', 'noise_block0', 'transition0', 'base'):
      self.assertGreater(float(tf.reduce_max(tf.abs(terms[name]))), 1e-3, msg=name)

  def test_elbo_through_the_joint_distribution(self):
    # ELBO = log p(x, noise) - log N(noise) - D ln 256 - log q(u|x), with p the TFP joint.
    eps = tf.random.stateless_normal([3, *self.model.dequantizer.noise_shape], seed=[13, 0])
    noise = [
      tf.random.stateless_normal([3, *s], seed=[13, k + 1])
      for k, s in enumerate(self.config.noise_shapes())
    ]
    terms = self.model.elbo_terms(self.images, dequant_noise=eps, noise=noise)
    u, log_q = self.model.dequantizer.sample_and_log_prob(tf.constant(self.images), noise=eps)
    x = (tf.cast(self.images, tf.float32) + u) / 256.0
    elbo = (
      self.model.joint_distribution.log_prob([x] + noise)
      - self.model.noise_distribution.log_prob(noise)
      - self.config.num_dims * _LOG_256
      - log_q
    )
    self.assertAllClose(elbo, terms['total'], atol=2e-3, rtol=1e-6)

  def test_log_prob_bound_reproduces_its_draws_and_exceeds_the_mean_elbo(self):
    seed = tf.constant([7, 8], tf.int64)
    k, chunk = 5, 2
    bound = self.model.log_prob_bound(self.images, num_samples=k, seed=seed, chunk_size=chunk)
    # Draw j lives in chunk j // chunk: elbo of the batch tiled `chunk` times, seed fold_in(i).
    elbos = []
    for i in range(3):
      tiled = np.tile(self.images, [chunk, 1, 1, 1])
      chunk_seed = tf.random.experimental.stateless_fold_in(seed, i)
      elbos.append(tf.reshape(self.model.elbo(tiled, chunk_seed), [chunk, 3]))
    elbos = tf.concat(elbos, 0)[:k]  # the surplus 6th draw is masked out
    want = tf.reduce_logsumexp(elbos, axis=0) - math.log(k)
    self.assertAllClose(bound, want, atol=1e-3, rtol=1e-6)
    self.assertAllGreaterEqual(bound - tf.reduce_mean(elbos, axis=0), -1e-4)
    self.assertGreater(float(tf.reduce_max(bound - tf.reduce_mean(elbos, axis=0))), 0.0)

  def test_log_prob_bound_with_one_sample_is_the_elbo(self):
    seed = tf.constant([9, 10], tf.int64)
    bound = self.model.log_prob_bound(self.images, num_samples=1, seed=seed)
    elbo = self.model.elbo(self.images, tf.random.experimental.stateless_fold_in(seed, 0))
    self.assertAllClose(bound, elbo, atol=1e-4, rtol=1e-6)

  def test_bits_per_dim(self):
    seed = tf.constant([1, 2], tf.int64)
    bpd = self.model.bits_per_dim(self.images, seed=seed)
    want = -self.model.elbo(self.images, seed) / (self.config.num_dims * math.log(2.0))
    self.assertAllClose(bpd, want, rtol=1e-6)
    iw = self.model.bits_per_dim(self.images, num_samples=3, seed=seed)
    want = -self.model.log_prob_bound(self.images, 3, seed) / (self.config.num_dims * math.log(2.0))
    self.assertAllClose(iw, want, rtol=1e-6)

  def test_bits_per_dim_at_initialisation_is_about_eight(self):
    model = tdf.DenseFlow(self.config, seed=5)
    images = _images(self.config, 8, seed=14)  # uniform random uint8
    model.initialize(images)
    bpd = model.bits_per_dim(images, seed=tf.constant([3, 4], tf.int64)).numpy()
    self.assertAllInRange(bpd, 7.5, 9.0)

  def test_same_seed_same_numbers_different_seed_different(self):
    a = tf.constant([1, 1], tf.int64)
    b = tf.constant([1, 2], tf.int64)
    elbo_a = self.model.elbo(self.images, a)
    self.assertAllEqual(elbo_a, self.model.elbo(self.images, a))
    self.assertNotAllClose(elbo_a, self.model.elbo(self.images, b))
    bound_a = self.model.log_prob_bound(self.images, 2, a)
    self.assertAllEqual(bound_a, self.model.log_prob_bound(self.images, 2, a))
    self.assertNotAllClose(bound_a, self.model.log_prob_bound(self.images, 2, b))
    sample_a = self.model.sample(2, a)
    self.assertAllEqual(sample_a, self.model.sample(2, a))
    self.assertNotAllClose(sample_a, self.model.sample(2, b))

  def test_sample(self):
    seed = tf.constant([5, 6], tf.int64)
    samples = self.model.sample(4, seed)
    self.assertEqual(samples.dtype, tf.uint8)
    self.assertEqual(samples.shape, [4, 16, 16, 3])
    self.assertAllEqual(samples, self.model.sample(4, seed))
    self.assertGreater(len(np.unique(samples.numpy())), 10)
    self.assertEqual(self.model.sample(0, seed).shape, [0, 16, 16, 3])

  def test_temperature_zero_gives_the_mean_image(self):
    cold = self.model.sample(3, tf.constant([1, 1], tf.int64), temperature=0.0)
    other = self.model.sample(3, tf.constant([2, 2], tf.int64), temperature=0.0)
    self.assertAllEqual(cold, other)
    self.assertAllEqual(cold, tf.repeat(cold[:1], 3, axis=0))
    zeros = [tf.zeros([1, *s]) for s in self.config.latent_shapes()]
    self.assertAllEqual(cold[:1], self.model.decode(zeros))
    warm = self.model.sample(3, tf.constant([1, 1], tf.int64), temperature=0.7)
    self.assertNotAllClose(warm[0], warm[1])

  @parameterized.named_parameters(
    ('wrong_shape', np.zeros([2, 8, 8, 3], np.uint8), ValueError, 'shape'),
    ('wrong_rank', np.zeros([16, 16, 3], np.uint8), ValueError, 'shape'),
    ('wrong_dtype', np.zeros([2, 16, 16, 3], np.bool_), TypeError, 'dtype'),
  )
  def test_bad_images_raise(self, images, error, pattern):
    with self.assertRaisesRegex(error, pattern):
      self.model.elbo(images)

  def test_bad_arguments_raise(self):
    with self.assertRaisesRegex(ValueError, 'num_samples'):
      self.model.log_prob_bound(self.images, num_samples=0)
    with self.assertRaisesRegex(ValueError, 'num'):
      self.model.sample(-1)
    with self.assertRaisesRegex(TypeError, 'config'):
      tdf.DenseFlow({'image_shape': (16, 16, 3)})


_NAN = float('nan')


class InputChecksTest(tf.test.TestCase, parameterized.TestCase):
  """Inputs that cannot be scored right are refused by name: eager, NumPy, tensors, tf.function."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = _small_config(dequantization='uniform')
    cls.model = _initialized_perturbed(cls.config, seed=4)
    cls.images = _images(cls.config, 3, seed=9)

  @parameterized.named_parameters(
    ('float_unit_interval', lambda im: (im / 255.0).astype(np.float32)),
    ('int32_300', lambda im: np.full(im.shape, 300, np.int32)),
    ('int64_negative', lambda im: np.full(im.shape, -5, np.int64)),
    ('float_nan', lambda im: np.where(im > 128, _NAN, im).astype(np.float32)),
    ('float_fraction', lambda im: im.astype(np.float64) + 0.5),
    ('float_inf', lambda im: np.full(im.shape, np.inf, np.float32)),
  )
  def test_images_that_are_not_levels_are_refused_by_name(self, make):
    bad = make(self.images)
    for method in (
      lambda im: self.model.elbo(im),
      lambda im: self.model.bits_per_dim(im),
      lambda im: self.model.log_prob_bound(im, num_samples=2),
      lambda im: self.model.elbo_terms(im),
    ):
      for images in (bad, tf.constant(bad)):
        with self.assertRaisesRegex(ValueError, '`images` must hold integer pixel levels'):
          method(images)
    traced = tf.function(lambda im: self.model.elbo(im, [1, 2]))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, '`images` must hold integer'):
      traced(tf.constant(bad))

  def test_integer_levels_in_any_dtype_score_as_uint8(self):
    want = self.model.elbo(self.images, [1, 2])
    for dtype in (np.int32, np.int64, np.float32, np.float64):
      self.assertAllClose(self.model.elbo(self.images.astype(dtype), [1, 2]), want, atol=1e-4)
    traced = tf.function(lambda im: self.model.elbo(im, [1, 2]))
    self.assertAllClose(traced(tf.constant(self.images, tf.float32)), want, atol=1e-4)

  @parameterized.named_parameters(
    ('zero', 0, ValueError),
    ('negative_numpy', np.int64(-3), ValueError),
    ('fraction', 2.5, ValueError),
    ('nan', _NAN, ValueError),
    ('tensor_zero', tf.constant(0), ValueError),
    ('bool', True, TypeError),
    ('string', '4', TypeError),
  )
  def test_bad_counts_are_refused_by_name(self, value, error):
    with self.assertRaisesRegex(error, '`num_samples`'):
      self.model.log_prob_bound(self.images, num_samples=value)
    with self.assertRaisesRegex(error, '`num_samples`'):
      self.model.bits_per_dim(self.images, num_samples=value)
    with self.assertRaisesRegex(error, '`chunk_size`'):
      self.model.log_prob_bound(self.images, num_samples=2, chunk_size=value)
    if not (error is ValueError and float(np.asarray(value)) == 0):  # sample(0): an empty batch
      with self.assertRaisesRegex(error, '`num`'):
        self.model.sample(value)

  @parameterized.named_parameters(
    ('nan', _NAN),
    ('negative', -1.0),
    ('numpy_inf', np.float32(np.inf)),
    ('tensor', tf.constant(-0.5)),
  )
  def test_bad_temperature_is_refused_by_name(self, value):
    with self.assertRaisesRegex(ValueError, '`temperature`'):
      self.model.sample(2, [1, 2], temperature=value)

  def test_bad_counts_inside_tf_function_fail_by_name(self):
    traced = tf.function(lambda n: self.model.log_prob_bound(self.images, num_samples=n))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, '`num_samples` must be >= 1'):
      traced(tf.constant(0))
    self.assertAllClose(traced(tf.constant(2)), self.model.log_prob_bound(self.images, 2))

  @parameterized.named_parameters(
    ('float', [1.5, 2.0], TypeError), ('three', [1, 2, 3], ValueError), ('bool', True, TypeError)
  )
  def test_bad_seeds_are_refused_by_name(self, seed, error):
    with self.assertRaisesRegex(error, '`seed`'):
      self.model.elbo(self.images, seed)
    with self.assertRaisesRegex(error, '`seed`'):
      self.model.sample(2, seed)

  def test_empty_batches(self):
    # oneDNN's Conv2D returns its input for an empty batch on Intel AMX CPUs (BUILD.md).
    empty = np.zeros([0, *self.config.image_shape], np.uint8)
    self.assertEqual(self.model.elbo(empty).shape, [0])
    self.assertEqual(self.model.log_prob_bound(empty, 3).shape, [0])
    self.assertEqual(self.model.sample(0, [1, 2]).shape, [0, *self.config.image_shape])
    traced = tf.function(
      lambda im: self.model.elbo(im, [1, 2]),
      input_signature=[tf.TensorSpec([None, *self.config.image_shape], tf.uint8)],
    )
    self.assertEqual(traced(empty).shape, [0])
    self.assertAllClose(traced(self.images), self.model.elbo(self.images, [1, 2]), atol=1e-4)


class NumBitsTest(tf.test.TestCase):
  """`num_bits < 8` follows Glow: low bits dropped, bits/dim per 2**num_bits-level dimension."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = _small_config(num_bits=5)
    cls.model = tdf.DenseFlow(cls.config, seed=2)
    cls.model.initialize(_images(cls.config, 16, seed=1))

  def test_about_num_bits_per_dim_at_init_on_uniform_data(self):
    bpd = float(
      tf.reduce_mean(self.model.bits_per_dim(_images(self.config, 16, seed=2), seed=[1, 2]))
    )
    self.assertBetween(bpd, 4.9, 6.0)  # an 8-bit model scores about 8 here

  def test_the_low_bits_are_ignored(self):
    images = _images(self.config, 4, seed=3)
    low = np.random.default_rng(4).integers(0, 8, images.shape, dtype=np.uint8)
    self.assertAllEqual(self.model.elbo(images, [3, 4]), self.model.elbo(images ^ low, [3, 4]))
    self.assertNotAllClose(self.model.elbo(images, [3, 4]), self.model.elbo(images // 2, [3, 4]))

  def test_samples_are_on_the_0_to_255_scale(self):
    samples = self.model.sample(8, [5, 6]).numpy()
    self.assertEqual(samples.dtype, np.uint8)
    self.assertAllEqual(samples % 8, np.zeros_like(samples))
    self.assertGreater(samples.max(), 31)

  def test_num_bits_out_of_range_is_refused(self):
    for bad in (0, 9, 5.5, True):
      with self.assertRaisesRegex((ValueError, TypeError), '`num_bits`'):
        _small_config(num_bits=bad)


class InitializationAndVariablesTest(tf.test.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = tdf.DenseFlowConfig.tiny()

  def test_initialize_sets_every_actnorm_once(self):
    model = tdf.DenseFlow(self.config, seed=3)
    steps = model.bijector.steps
    self.assertLen(steps, 6)
    self.assertFalse(model.is_initialized)
    model.initialize(_images(self.config, 4, seed=15))
    self.assertTrue(model.is_initialized)
    for step in steps:
      self.assertTrue(bool(step.act_norm.initialized.numpy()))
      self.assertTrue(np.any(step.act_norm.shift.numpy()))
      self.assertTrue(np.any(step.act_norm.log_scale.numpy()))
    before = [v.numpy().copy() for v in model.trainable_variables]
    moving = [v.numpy().copy() for v in model.non_trainable_keras_variables]
    model.initialize(_images(self.config, 4, seed=16))  # a no-op the second time
    for v, b in zip(model.trainable_variables, before):
      self.assertAllEqual(v, b)
    for v, b in zip(model.non_trainable_keras_variables, moving):
      self.assertAllEqual(v, b)

  def test_every_trainable_variable_gets_a_gradient(self):
    model = _initialized_perturbed(self.config, seed=4)
    variables = model.trainable_variables
    images = _images(self.config, 4, seed=17)
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(model.elbo(images, tf.constant([1, 2], tf.int64), training=True))
    grads = tape.gradient(loss, variables)
    missing = [v.name for v, g in zip(variables, grads) if g is None]
    self.assertEmpty(missing)
    for v, g in zip(variables, grads):
      self.assertTrue(np.all(np.isfinite(tf.convert_to_tensor(g).numpy())), msg=v.name)
    zero = [v.name for v, g in zip(variables, grads) if not np.any(tf.convert_to_tensor(g).numpy())]
    self.assertEmpty(zero)

  def test_variable_counts(self):
    model = tdf.DenseFlow(self.config)
    cfg = self.config
    steps = sum(u * s for u, s in zip(cfg.units_per_block, cfg.steps_per_unit))  # 6
    coupling_net = 2 + 4 + 4 * cfg.dense_depth + 2 + 2 + 1 + 2  # see bijectors_test
    glow_step = 2 + 1 + coupling_net  # ActNorm shift/log_scale, 1x1 kernel, network
    cross_unit = 4 * sum(u - 1 for u in cfg.units_per_block)  # two convs with bias each
    base = 2
    dense_block = lambda depth: 4 * depth + 2  # noqa: E731
    dequant = 2 + (cfg.dequant_steps + 1)  # loc, log_scale, 1x1 kernels
    dequant += 2 * dense_block(cfg.dequant_context_depth) + 2  # context net
    dequant += cfg.dequant_steps * (2 + dense_block(cfg.dequant_depth) + 2)  # coupling nets
    want = steps * glow_step + cross_unit + base + dequant
    self.assertEqual(want, 209)
    self.assertLen(model.trainable_variables, want)
    self.assertEqual(model.num_parameters(), 75532)
    # tf.Module alone sees only the tf.Variables: the Keras 3 gap (tensorflow/tensorflow#84019).
    plain = tf.Module.trainable_variables.fget(model)
    self.assertLen(plain, steps * 3 + base + 2 + cfg.dequant_steps + 1)  # 25
    self.assertLess(len(plain), len(model.trainable_variables))
    self.assertLen(model.non_trainable_keras_variables, 2 * steps)  # batch-norm running stats
    self.assertLen({id(v) for v in model.trainable_variables}, want)

  def test_training_updates_batch_norm_statistics_only_in_training(self):
    model = tdf.DenseFlow(self.config, seed=6)
    images = _images(self.config, 2, seed=18)
    before = [v.numpy().copy() for v in model.non_trainable_keras_variables]
    model.elbo(images)
    for v, b in zip(model.non_trainable_keras_variables, before):
      self.assertAllEqual(v, b)
    model.elbo(images, training=True)
    changed = [np.any(v.numpy() != b) for v, b in zip(model.non_trainable_keras_variables, before)]
    self.assertTrue(all(changed))


if __name__ == '__main__':
  tf.test.main()
