"""Tests for tf_denseflow.precision and mixed-precision training steps (train_step).

bfloat16 and float16 conditioner networks (coupling, cross-unit, dequantization) train with
finite losses on two MirroredStrategy replicas (two logical CPUs; one GPU where there is one);
float16's dynamic loss scale halves on a forced overflow (the step is skipped, nothing changes)
and doubles after `growth_steps` applied steps. The bijector math, log-dets and batch-norm
statistics stay float32.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver, parameterized

import tf_denseflow as tdf
from tf_denseflow import cluster, precision, replica_loss, seeds
from tf_denseflow import flags as flags_lib
from tf_denseflow import train_config as train_config_lib
from tf_denseflow import train_step as train_step_lib
from tf_denseflow.nn import layers as nn_layers
from tf_denseflow.optim import Adamax

_BATCH = 4  # global, 2 per replica
# Exact float32 reference gradients on GPUs too (benchmarks/gpu_check.sh runs this file).
tf.config.experimental.enable_tensor_float_32_execution(False)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags_lib.define_flags()


def _config(coupling_dtype):
  return tdf.DenseFlowConfig.tiny(
    image_shape=(8, 8, 3),
    units_per_block=(2, 2),
    steps_per_unit=(1, 1),
    coupling_channels=(4, 4),
    attention_landmarks=2,
    coupling_dtype=coupling_dtype,
  )


def _images(seed=0):
  return np.random.default_rng(seed).integers(0, 256, [_BATCH, 8, 8, 3], dtype=np.uint8)


def _weights(model):
  return [v.numpy().copy() for v in model.trainable_variables]


class Run:
  """A model, its optimizer and the training loop's own step on two CPU replicas (or a GPU)."""

  def __init__(self, coupling_dtype, **loss_scale_kwargs):
    gpus = tf.config.list_logical_devices('GPU')[:1]  # float16 GPU kernels where there are some
    devices = [d.name for d in gpus or tf.config.list_logical_devices('CPU')[:2]]
    self.strategy = strategy = cluster.mirrored_strategy(devices)
    config = _config(coupling_dtype)
    with strategy.scope():
      self.model = model = tdf.DenseFlow(config, seed=1)
      self.optimizer = Adamax(learning_rate=1e-3)
      self.optimizer.build(model.trainable_variables)
      self.loss_scale = precision.loss_scale_for(coupling_dtype, **loss_scale_kwargs)
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False)
      model.initialize(_images(9))
    per_replica = _BATCH // strategy.num_replicas_in_sync
    self.train_step = train_step_lib.make_train_step(
      strategy,
      model,
      self.optimizer,
      model.trainable_variables,
      lambda images, s, replica: replica_loss.replica_noise(model, s, replica, _BATCH, per_replica),
      lambda images, noise: replica_loss.nll_given_noise(model, images, noise, training=True),
      _BATCH,
      self.step,
      self.skipped,
      seed_fn=lambda s: seeds.step_seed(0, s),
      learning_rate_fn=lambda s: tf.constant(1e-3),
      loss_scale=self.loss_scale,
    )
    dataset = tf.data.Dataset.from_tensor_slices(np.stack([_images(i) for i in range(3)]))
    dataset = dataset.unbatch().batch(_BATCH).repeat()
    self.iterator = iter(strategy.experimental_distribute_dataset(dataset))

  def __call__(self):
    return {k: v.numpy() for k, v in self.train_step(self.iterator).items()}


class DynamicLossScaleTest(tf.test.TestCase, parameterized.TestCase):
  def test_halves_on_overflow_and_doubles_after_growth_steps(self):
    scale = precision.DynamicLossScale(initial_scale=8.0, growth_steps=3, min_scale=2.0)
    t, f = tf.constant(True), tf.constant(False)
    history = []
    for applied, overflow in [(t, f), (t, f), (f, t), (t, f), (t, f), (t, f), (t, f)]:
      scale.update(applied, overflow)
      history.append((float(scale.scale.numpy()), int(scale.good_steps.numpy())))
    # two good steps, an overflow (halve, count restarts), three good steps (double, restart).
    self.assertEqual(history, [(8, 1), (8, 2), (4, 0), (4, 1), (4, 2), (8, 0), (8, 1)])
    for _ in range(3):
      scale.update(f, t)
    self.assertEqual(float(scale.scale.numpy()), 2.0)  # never below min_scale
    self.assertFalse(scale.can_shrink())
    scale.update(f, f)  # skipped for another reason: nothing changes
    self.assertEqual(float(scale.scale.numpy()), 2.0)

  def test_never_above_max_scale(self):
    scale = precision.DynamicLossScale(initial_scale=4.0, growth_steps=1, max_scale=8.0)
    for _ in range(3):
      scale.update(tf.constant(True), tf.constant(False))
    self.assertEqual(float(scale.scale.numpy()), 8.0)

  def test_keras_defaults_and_checkpointed_variables(self):
    scale = precision.DynamicLossScale()
    self.assertEqual(float(scale.scale.numpy()), 2.0**15)
    self.assertEqual(scale.growth_steps, 2000)
    self.assertCountEqual(
      [v.name for v in scale.variables], ['loss_scale/scale:0', 'loss_scale/good_steps:0']
    )
    scale.scale.assign(64.0)
    path = tf.train.Checkpoint(loss_scale=scale).save(self.get_temp_dir() + '/ckpt')
    restored = precision.DynamicLossScale()
    tf.train.Checkpoint(loss_scale=restored).restore(path).assert_consumed()
    self.assertEqual(float(restored.scale.numpy()), 64.0)

  @parameterized.named_parameters(
    ('not_power_of_two', dict(initial_scale=3.0), 'initial_scale'),
    ('zero', dict(min_scale=0.0), 'min_scale'),
    ('inf', dict(max_scale=float('inf')), 'max_scale'),
    ('order', dict(initial_scale=1.0, min_scale=2.0), 'min_scale <= initial_scale'),
    ('growth', dict(growth_steps=0), 'growth_steps'),
    ('growth_bool', dict(growth_steps=True), 'growth_steps'),
  )
  def test_bad_arguments_are_refused_by_name(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      precision.DynamicLossScale(**kwargs)

  def test_loss_scale_only_for_float16(self):
    self.assertIsNone(precision.loss_scale_for('float32'))
    self.assertIsNone(precision.loss_scale_for('bfloat16'))
    self.assertIsInstance(precision.loss_scale_for('float16'), precision.DynamicLossScale)
    with self.assertRaisesRegex(ValueError, 'precision'):
      precision.loss_scale_for('float64')


class MixedPrecisionTrainingTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(('bfloat16', 'bfloat16'), ('float16', 'float16'))
  def test_float32_where_it_matters(self, dtype):
    model = tdf.DenseFlow(_config(dtype), seed=1)
    images = _images()
    model.initialize(images)
    terms = model.elbo_terms(tf.constant(images), seed=tf.constant([1, 2]), training=True)
    for name, value in terms.items():
      self.assertEqual(value.dtype, tf.float32, msg=name)
      self.assertTrue(np.all(np.isfinite(value.numpy())), msg=name)
    for layer in model.batch_norm_layers:
      self.assertEqual(layer.moving_mean.dtype, 'float32')
      self.assertEqual(layer.moving_variance.dtype, 'float32')
    self.assertTrue(all(v.dtype == tf.float32 for v in model.trainable_variables))

  @parameterized.named_parameters(('bfloat16', 'bfloat16'), ('float16', 'float16'))
  def test_every_conditioner_network_computes_in_the_precision(self, dtype):
    # The coupling, cross-unit and dequantization networks (context and couplings) all run in
    # the precision's dtype; before, the last three stayed float32 (the dequantization alone is
    # 28% of `small`'s FLOPs).
    model = tdf.DenseFlow(_config(dtype), seed=1)
    convs = model._layers_of_type(nn_layers.Conv)
    owners = {type(layer).__name__ for layer in model._keras_layers()}
    self.assertLessEqual(
      {'CouplingNetwork', 'CrossUnitNetwork', 'ContextNetwork', 'DequantCouplingNetwork'}, owners
    )
    self.assertNotEmpty(convs)
    self.assertEqual({c.compute_dtype_name for c in convs}, {dtype})

  def test_bfloat16_steps_are_finite_and_applied(self):
    run = Run('bfloat16')
    self.assertIsNone(run.loss_scale)
    before = _weights(run.model)
    for _ in range(3):
      out = run()
      self.assertTrue(out['finite'])
      self.assertTrue(np.isfinite(out['loss']))
      self.assertEqual(out['skip_reason'], 0)
    changed = [
      not np.array_equal(a, b.numpy()) for a, b in zip(before, run.model.trainable_variables)
    ]
    self.assertGreater(sum(changed), len(changed) // 2)

  def test_float16_overflow_is_skipped_and_halves_the_scale_then_good_steps_double_it(self):
    run = Run('float16', initial_scale=2.0**40, growth_steps=2)
    before = _weights(run.model)
    slots = [v.numpy().copy() for v in run.optimizer.variables]
    out = run()
    # 2**40 times any gradient reaching the float16 networks is Inf in float16.
    self.assertFalse(out['finite'])
    self.assertEqual(out['skip_reason'], train_step_lib.LOSS_SCALE_OVERFLOW)
    self.assertTrue(np.isfinite(out['loss']))
    self.assertEqual(float(run.loss_scale.scale.numpy()), 2.0**39)
    self.assertEqual(int(run.skipped.numpy()), 1)
    for a, b in zip(before, run.model.trainable_variables):
      self.assertAllEqual(a, b)
    for a, b in zip(slots, run.optimizer.variables):
      self.assertAllEqual(a, b)

    # A usable scale (read at run time: the same traced step): two applied steps double it.
    run.loss_scale.scale.assign(2.0**8)
    for expected in (2.0**8, 2.0**9):
      out = run()
      self.assertTrue(out['finite'], msg=train_step_lib.SKIP_REASONS[out['skip_reason']])
      self.assertTrue(np.isfinite(out['loss']) and np.isfinite(out['grad_norm']))
      self.assertEqual(float(run.loss_scale.scale.numpy()), expected)
    self.assertEqual(int(run.loss_scale.good_steps.numpy()), 0)
    changed = [
      not np.array_equal(a, b.numpy()) for a, b in zip(before, run.model.trainable_variables)
    ]
    self.assertGreater(sum(changed), len(changed) // 2)

  def test_float16_gradients_equal_float32_scaled_gradients(self):
    # The scaled-and-unscaled gradient of a float32 model equals the plain one: the scale is a
    # power of 2, so the unscaling is exact.
    model = tdf.DenseFlow(_config('float32'), seed=1)
    images = _images()
    model.initialize(images)
    variables = model.trainable_variables
    noise = replica_loss.replica_noise(model, tf.constant([3, 4], tf.int64), 0, _BATCH, _BATCH)

    def nll():
      return replica_loss.nll_given_noise(model, images, noise, training=True)

    plain = train_step_lib.replica_loss_and_grads(model, variables, nll, _BATCH)
    scaled = train_step_lib.replica_loss_and_grads(
      model, variables, nll, _BATCH, tf.constant(1024.0)
    )
    self.assertAllEqual(plain[0], scaled[0])
    for a, b in zip(plain[1], scaled[1]):
      self.assertAllClose(a, b, rtol=1e-6, atol=1e-12)


class PrecisionFlagTest(tf.test.TestCase, parameterized.TestCase):
  def _parse(self, *args):
    cwd = os.getcwd()
    os.chdir(_REPO)
    try:
      FLAGS.unparse_flags()
      FLAGS(['train', '--dataset=embedded', '--model_preset=tiny', *args])
      return train_config_lib.TrainConfig.from_flags(FLAGS)
    finally:
      os.chdir(cwd)
      FLAGS.unparse_flags()

  @flagsaver.flagsaver
  def test_precision_sets_the_coupling_dtype(self):
    for value in ('float32', 'bfloat16', 'float16'):
      config = self._parse(f'--precision={value}')
      self.assertEqual(config.precision, value)
      self.assertEqual(config.model.coupling_dtype, value)
    default = self._parse()
    self.assertEqual((default.precision, default.model.coupling_dtype), ('float32', 'float32'))
    legacy = self._parse('--coupling_dtype=bfloat16')
    self.assertEqual(legacy.precision, 'bfloat16')
    self.assertEqual(self._parse('--conv_kernels=library').conv_kernels, 'library')

  @flagsaver.flagsaver
  def test_conflicting_precision_and_coupling_dtype_are_refused(self):
    with self.assertRaisesRegex(train_config_lib.ConfigError, 'precision.*coupling_dtype'):
      self._parse('--precision=float16', '--coupling_dtype=bfloat16')
    self.assertEqual(
      self._parse('--precision=bfloat16', '--coupling_dtype=bfloat16').precision, 'bfloat16'
    )

  def test_train_config_precision_follows_or_must_match_the_model(self):
    base = train_config_lib.TrainConfig()
    self.assertEqual(base.precision, 'float32')
    model = dataclasses.replace(base.model, coupling_dtype='float16')
    self.assertEqual(train_config_lib.TrainConfig(model=model).precision, 'float16')
    with self.assertRaisesRegex(train_config_lib.ConfigError, 'precision'):
      train_config_lib.TrainConfig(model=model, precision='bfloat16')
    with self.assertRaisesRegex(train_config_lib.ConfigError, 'conv_kernels'):
      train_config_lib.TrainConfig(conv_kernels='gpu')


if __name__ == '__main__':
  tf.test.main()
