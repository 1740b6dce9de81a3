"""Tests for tf_denseflow.train_lib: the MirroredStrategy loop on two logical CPU devices.

The data are real TFDS datasets read by the real loader: a tiny `cifar10` written under its TFDS
name with `store_as_tfds_dataset`, and the embedded photo-patch dataset built at 8x8. The model
is a micro DenseFlow (2 blocks, uniform dequantization, no attention) so that tracing stays short.

What "1 replica == 2 replicas" means here (and what it cannot mean): with
`noise_seeding='global_batch'` both runs see the same examples in the same global batches and the
same noise per example. In evaluation mode (running batch-norm statistics) the bound is therefore
the same function and must agree to float precision. In training mode the coupling networks'
batch norm normalises with the statistics of the *per-replica* batch, so a 2-replica step is the
mean of two half-batch losses, not the loss of the full batch on one device: the two agree at
step 0 (zero-initialised coupling outputs make batch norm irrelevant) and diverge after the first
update. The test checks exactly that: step 0 equal, step 1 equal to the mean of the half-batch
losses recomputed on one device from the step-1 checkpoint, and the final evaluations equal.
"""

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import parameterized

from tf_denseflow import data as data_lib
from tf_denseflow import train_lib
from tf_denseflow import trainer as trainer_lib
from tf_denseflow import workdir as workdir_lib
from tf_denseflow.config import DenseFlowConfig
from tf_denseflow.model import DenseFlow

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DATA = {}


def _data_dir() -> str:
  """A TFDS data dir (built once per session) with a tiny cifar10 and an 8x8 embedded set."""
  if 'dir' not in _DATA:
    root = tempfile.mkdtemp(prefix='train_test_data_')
    rng = np.random.default_rng(0)

    def examples(n):
      images = rng.integers(0, 256, [n, 32, 32, 3], dtype=np.uint8)
      return [(i, {'image': x, 'label': i % 10, 'id': f'x{i}'}) for i, x in enumerate(images)]

    tfds.dataset_builders.store_as_tfds_dataset(
      name='cifar10',
      version='3.0.2',
      features=tfds.builder('cifar10').info.features,
      split_datasets={'train': examples(24), 'test': examples(10)},
      data_dir=root,
    )
    data_lib.build_embedded_dataset(root, image_size=8, num_train=64, num_test=16)
    _DATA['dir'] = root
  return _DATA['dir']


def _micro_model(image_size: int) -> DenseFlowConfig:
  return DenseFlowConfig.tiny(
    (image_size, image_size, 3),
    units_per_block=(2, 1),
    steps_per_unit=(1, 1),
    coupling_channels=(8, 8),
    dequantization='uniform',
    use_attention=False,
  )


def _config(dataset='embedded', replicas=1, steps=3, **overrides) -> train_lib.TrainConfig:
  size = 32 if dataset == 'cifar10' else 8
  data = data_lib.DataConfig(
    dataset=dataset,
    data_dir=_data_dir(),
    image_size=None if dataset == 'cifar10' else 8,
    embedded_num_train=64,
    embedded_num_test=16,
    shuffle_buffer=64,
  )
  kwargs = dict(
    model=_micro_model(size),
    data=data,
    optim=train_lib.OptimConfig(
      global_batch_size=4, warmup_steps=2, train_steps=steps - 1, finetune_steps=1
    ),
    num_cpu_devices=replicas,
    checkpoint_every=1,
    eval_examples=0,
    num_grid_samples=0,
    log_every=1,
    progress_bar=False,
  )
  kwargs.update(overrides)
  return train_lib.TrainConfig(**kwargs)


def _values(variables):
  return [np.array(tf.convert_to_tensor(v)) for v in variables]


def _state(result):
  model = result.model
  return _values(
    model.trainable_variables + model.non_trainable_keras_variables + result.optimizer.variables
  )


def _poisoned_loss_at(*steps):
  """Patches the trainer's per-replica loss to NaN at the given global steps.

  The whole per-example loss is multiplied by NaN inside the traced step (after the forward pass
  has recorded its batch-norm statistics), so the step's own guard must catch and skip it.
  """
  original = trainer_lib.Trainer.replica_loss

  def poisoned(self, images, noise):
    nll = original(self, images, noise)
    hit = tf.reduce_any(tf.equal(tf.cast(self.step, tf.int64), list(steps)))
    return nll * tf.where(hit, float('nan'), 1.0)

  return mock.patch.object(trainer_lib.Trainer, 'replica_loss', poisoned)


class _TestCase(tf.test.TestCase, parameterized.TestCase):
  def _new_dir(self) -> str:
    path = tempfile.mkdtemp(prefix='train_test_')
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


class TrainLoopTest(_TestCase):
  def test_two_replicas_match_one_replica(self):
    workdir = self._new_dir()
    config = _config('cifar10', replicas=2, eval_examples=10, eval_batch_size=4, num_grid_samples=4)
    two = train_lib.train(config, workdir)

    self.assertEqual(two.num_replicas, 2)
    self.assertEqual(two.step, 3)
    self.assertTrue(np.all(np.isfinite([loss for _, loss in two.losses])))
    self.assertTrue(np.isfinite(two.test_bpd))
    self.assertEqual(two.checkpoint, os.path.join(workdir, 'checkpoints', 'ckpt-3'))
    self.assertTrue(os.path.exists(two.samples))
    self.assertNotEmpty(glob.glob(os.path.join(workdir, 'tb', 'events.out.tfevents.*')))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    self.assertEqual([r['step'] for r in records if 'train_bits_per_dim' in r], [1, 2, 3])
    self.assertEqual(records[-2]['eval_bits_per_dim'], two.test_bpd)
    # The last record: where the time went (train_loop.Reporter.timing), as in the result.
    self.assertEqual(records[-1], {'step': 3, 'timing': two.timing})
    timing = two.timing
    parts = ('train_s', 'setup_s', 'first_call_s', 'eval_s', 'checkpoint_s', 'sample_s')
    self.assertAlmostEqual(sum(timing[k] for k in parts), timing['wall_s'], delta=0.01)
    for key in (
      'setup_s',
      'first_call_s',
      'eval_s',
      'checkpoint_s',
      'sample_s',
      'train_images_per_s',
    ):
      self.assertGreater(timing[key], 0.0, key)
    # Every variable (weights, batch-norm statistics, optimizer slots) is in sync on both replicas.
    model = two.model
    for v in (
      model.trainable_variables + model.non_trainable_keras_variables + two.optimizer.variables
    ):
      v = v.value if isinstance(v, keras.Variable) else v
      replica_values = [np.array(x) for x in v.values]
      self.assertAllEqual(replica_values[0], replica_values[1])

    # Training mode, step 1 (after one update): the mean of the two half-batch losses, each with
    # its own batch-norm statistics, recomputed on one device from the step-1 checkpoint.
    model, step = workdir_lib.restore_model(workdir, os.path.join(workdir, 'checkpoints', 'ckpt-1'))
    self.assertEqual(step, 1)
    halves = data_lib.make_train_dataset(config.data, 2, seed=config.seed, skip_batches=2).take(2)
    seed = train_lib.step_seed(config.seed, 1)
    nll = [
      train_lib.negative_elbo(model, images, seed, replica, 4, training=True)
      for replica, images in enumerate(halves)
    ]
    self.assertAllClose(float(tf.reduce_sum(nll)) / 4, two.losses[1][1], rtol=1e-5)

    # Evaluation mode on one replica, resumed from the 2-replica run's last checkpoint: the
    # same bound (10 test examples, padded to 12 with masked images).
    one = train_lib.train(_config('cifar10', 1, eval_examples=10, eval_batch_size=4), workdir)
    self.assertEqual((one.start_step, one.step, one.losses), (3, 3, []))
    self.assertAllClose(one.test_bpd, two.test_bpd, rtol=1e-5)

    # Step 0 from scratch on one replica: the same examples, noise and (at initialisation) loss.
    fresh = train_lib.train(_config('cifar10', 1, steps=1), self._new_dir())
    self.assertAllClose(fresh.losses[0][1], two.losses[0][1], rtol=1e-6)

  def test_one_device_strategy_equals_one_mirrored_replica(self):
    one_device = train_lib.train(_config(num_cpu_devices=0, strategy='one_device'), self._new_dir())
    mirrored = train_lib.train(_config(num_cpu_devices=0), self._new_dir())
    self.assertEqual(one_device.losses, mirrored.losses)
    for a, b in zip(_state(one_device), _state(mirrored), strict=True):
      self.assertAllEqual(a, b)

  def test_float16_loss_scale_search_does_not_stop_the_run_and_is_checkpointed(self):
    # The scale starts at 2**15 and halves on every overflow: the first steps may all be skipped,
    # more in a row than max_consecutive_nonfinite, without stopping the run.
    config = _config(
      steps=6,
      model=dataclasses.replace(_micro_model(8), coupling_dtype='float16'),
      optim=train_lib.OptimConfig(
        global_batch_size=4,
        warmup_steps=2,
        train_steps=6,
        finetune_steps=0,
        max_consecutive_nonfinite=1,
      ),
    )
    self.assertEqual(config.precision, 'float16')
    workdir = self._new_dir()
    result = train_lib.train(config, workdir)
    self.assertEqual(result.step, 6)
    self.assertGreater(result.nonfinite_steps, 1)  # overflows in a row, the scale searched down
    self.assertTrue(all(np.all(np.isfinite(v)) for v in _state(result)))
    names = [name for name, _ in tf.train.list_variables(result.checkpoint)]
    self.assertTrue(any(name.startswith('loss_scale/') for name in names), names)

  def test_float32_checkpoint_resumes_in_float16(self):
    # --precision is weight-neutral: a run may continue in float16 from a float32 checkpoint,
    # whose checkpoint has no loss scale yet (the scale then starts at its initial value).
    workdir = self._new_dir()
    train_lib.train(_config(steps=2), workdir)
    float16 = dataclasses.replace(_micro_model(8), coupling_dtype='float16')
    result = train_lib.train(_config(steps=4, model=float16), workdir)
    self.assertEqual((result.start_step, result.step), (2, 4))
    names = [name for name, _ in tf.train.list_variables(result.checkpoint)]
    self.assertTrue(any(name.startswith('loss_scale/') for name in names), names)

  def test_actnorm_is_initialised_identically_on_both_replicas(self):
    strategy = train_lib.make_strategy(num_cpu_devices=2)
    config = _micro_model(8)
    images = np.random.default_rng(1).integers(0, 256, [4, 8, 8, 3], dtype=np.uint8)
    with strategy.scope():
      model = DenseFlow(config)
      model.initialize(images)
    self.assertTrue(model.is_initialized)
    for glow_step in model.bijector.steps:
      for v in (glow_step.act_norm.shift, glow_step.act_norm.log_scale):
        first, second = [np.array(x) for x in v.values]
        self.assertAllEqual(first, second)
        self.assertTrue(np.any(first != 0))

  def test_interrupted_and_resumed_run_equals_uninterrupted_run(self):
    config = _config(steps=4, checkpoint_every=2)
    straight = train_lib.train(config, self._new_dir())

    workdir = self._new_dir()

    def interrupt(step, metrics, model):
      if step == 1:
        raise KeyboardInterrupt

    with self.assertRaises(KeyboardInterrupt):
      train_lib.train(config, workdir, step_callback=interrupt)
    self.assertEqual(
      workdir_lib.latest_checkpoint(workdir), os.path.join(workdir, 'checkpoints', 'ckpt-1')
    )
    resumed = train_lib.train(config, workdir)

    self.assertEqual((resumed.start_step, resumed.step), (1, 4))
    self.assertAllClose(resumed.losses, straight.losses[1:], rtol=1e-6)
    for a, b in zip(_state(resumed), _state(straight)):
      self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)

  def test_jit_compile_on_two_cpu_replicas_matches_graph_mode(self):
    # The replica function holds no merge_call (batch-norm statistics are returned, not
    # assigned), so XLA compiles it on CPU devices too.
    plain = train_lib.train(_config(replicas=2, steps=2), self._new_dir())
    jit = train_lib.train(_config(replicas=2, steps=2, jit_compile=True), self._new_dir())
    self.assertEqual(jit.num_replicas, 2)
    self.assertAllClose([x for _, x in jit.losses], [x for _, x in plain.losses], rtol=1e-5)
    # Adamax's first updates are about lr * sign(grad): compare weights at that scale.
    for a, b in zip(_state(jit), _state(plain)):
      self.assertAllClose(a, b, rtol=1e-3, atol=2e-3)
    stats = lambda r: _values(r.model.non_trainable_keras_variables)  # noqa: E731
    for a, b in zip(stats(jit), stats(plain)):
      self.assertAllClose(a, b, rtol=1e-4, atol=1e-5)

  def test_steps_per_loop_gives_the_weights_of_single_steps(self):
    # Orbit's inner loop: 2 loops of 3 steps in one tf.function call each compute exactly the 6
    # single steps (every step's seed, learning rate and guard come from the step variable).
    single = train_lib.train(_config(steps=6), self._new_dir())
    looped = train_lib.train(_config(steps=6, steps_per_loop=3), self._new_dir())
    self.assertEqual(looped.step, 6)
    self.assertAllClose(looped.losses, single.losses, rtol=1e-6)
    for a, b in zip(_state(looped), _state(single)):
      self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)

  def test_recompute_grad_updates_batch_norm_statistics_once(self):
    model = dataclasses.replace(_micro_model(8), use_recompute_grad=True)
    recompute = train_lib.train(_config(steps=2, model=model), self._new_dir())
    plain = train_lib.train(_config(steps=2), self._new_dir())
    self.assertAllClose([x for _, x in recompute.losses], [x for _, x in plain.losses], rtol=1e-6)
    for a, b in zip(_state(recompute), _state(plain)):
      self.assertAllClose(a, b, rtol=1e-5, atol=1e-6)

  def test_nonfinite_steps_are_skipped_counted_and_never_saved(self):
    snapshots = {}

    def snapshot(step, metrics, model):
      snapshots[step] = _values(model.trainable_variables + model.non_trainable_keras_variables)

    with _poisoned_loss_at(1):
      result = train_lib.train(_config(steps=3), self._new_dir(), step_callback=snapshot)
    self.assertTrue(np.isnan(result.losses[1][1]))
    self.assertTrue(np.isfinite(result.losses[2][1]))
    self.assertEqual(result.nonfinite_steps, 1)
    self.assertEqual(int(result.optimizer.iterations.numpy()), 2)
    # The skipped step changed nothing, batch-norm running statistics included (the loss was
    # poisoned after the forward pass had updated them).
    for before, after in zip(snapshots[1], snapshots[2]):
      self.assertAllEqual(before, after)
    self.assertFalse(all(np.array_equal(a, b) for a, b in zip(snapshots[2], snapshots[3])))

    # Too many in a row: a clear error.
    optim = train_lib.OptimConfig(
      global_batch_size=4, train_steps=3, finetune_steps=0, max_consecutive_nonfinite=2
    )
    with self.assertRaisesRegex(
      train_lib.TrainingError, '2 consecutive steps skipped .*2 x non-finite loss'
    ):
      with _poisoned_loss_at(0, 1):
        train_lib.train(_config(optim=optim), self._new_dir())

    # Non-finite weights are never written.
    workdir = self._new_dir()

    def poison(step, metrics, model):
      if step == 1:
        weight = model.trainable_variables[0]
        weight.assign(tf.fill(weight.shape, float('nan')))

    with self.assertRaisesRegex(train_lib.TrainingError, 'Non-finite weights at step 2 \\(.*'):
      train_lib.train(_config(steps=3, checkpoint_every=2), workdir, step_callback=poison)
    self.assertIsNone(workdir_lib.latest_checkpoint(workdir))

  def test_update_that_would_overflow_is_skipped_counted_and_named(self):
    # issue 10, 7: a finite learning rate whose update overflows float32 (lr / (1 - beta_1) is
    # Inf at 1e38). The loss and gradients are finite; the update is never applied.
    snapshots = {}

    def snapshot(step, metrics, model):
      snapshots[step] = _values(model.trainable_variables + model.non_trainable_keras_variables)

    optim = train_lib.OptimConfig(
      global_batch_size=4,
      learning_rate=1e38,
      warmup_steps=1,
      train_steps=3,
      finetune_steps=0,
      max_consecutive_nonfinite=2,
    )
    workdir = self._new_dir()
    with self.assertRaisesRegex(
      train_lib.TrainingError,
      r'2 consecutive steps skipped \(steps 0-1: 2 x update that would overflow float32 .*'
      r'learning rate 1e\+38',
    ):
      train_lib.train(_config(optim=optim), workdir, step_callback=snapshot)
    for after in snapshots[1]:
      self.assertTrue(np.all(np.isfinite(after)))
    model, step = workdir_lib.restore_model(workdir)  # the step-1 checkpoint: finite, unchanged
    self.assertEqual(step, 1)
    for before, after in zip(snapshots[1], _values(model.trainable_variables)):
      self.assertAllEqual(before, after)

  def test_resume_refuses_a_checkpoint_of_another_model(self):
    # issue 10, 5: the workdir's config is the run's (1, 1), its checkpoint another model's.
    other = self._new_dir()
    workdir_lib.write_model_checkpoint(
      other, DenseFlow(dataclasses.replace(_micro_model(8), steps_per_unit=(2, 2)))
    )
    workdir = self._new_dir()
    workdir_lib.save_model_config(workdir, _micro_model(8))
    shutil.copytree(workdir_lib.checkpoint_dir(other), workdir_lib.checkpoint_dir(workdir))
    with self.assertRaisesRegex(
      train_lib.ConfigError,
      r'Cannot resume: checkpoint .*ckpt-0 was written for a different model config: '
      r'steps_per_unit \(2, 2\) vs \(1, 1\)',
    ):
      train_lib.train(_config(), workdir)
    # A checkpoint of the right model without the optimizer state (e.g. converted): resuming
    # would restart Adamax's moments silently, so it is refused too.
    workdir = self._new_dir()
    workdir_lib.write_model_checkpoint(workdir, DenseFlow(_micro_model(8)))
    with self.assertRaisesRegex(
      train_lib.ConfigError,
      r'variable\(s\) not in the checkpoint \(nonfinite_steps, optimizer/_iterations',
    ):
      train_lib.train(_config(), workdir)


class ScheduleAndConfigTest(_TestCase):
  def test_warmup_then_constant_then_finetune(self):
    schedule = train_lib.WarmupSchedule(
      train_lib.OptimConfig(learning_rate=1e-3, warmup_steps=4, train_steps=10, finetune_lr=2e-5)
    )
    lrs = [float(schedule(t)) for t in (0, 1, 3, 4, 9, 10, 50)]
    self.assertAllClose(lrs, [2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3, 2e-5, 2e-5])

  def test_exponential_decay_per_epoch(self):
    config = train_lib.OptimConfig(
      learning_rate=1.0,
      warmup_steps=1,
      lr_schedule='exponential',
      lr_decay_gamma=0.5,
      train_steps=100,
    )
    schedule = train_lib.WarmupSchedule(config, steps_per_epoch=10)
    self.assertAllClose([float(schedule(t)) for t in (0, 9, 10, 25)], [1.0, 1.0, 0.5, 0.25])

  def test_global_batch_not_divisible_by_replicas(self):
    config = _config(replicas=2, optim=train_lib.OptimConfig(global_batch_size=3))
    with self.assertRaisesRegex(train_lib.ConfigError, 'not divisible by the 2 replicas'):
      train_lib.train(config, self._new_dir())

  def test_architecture_change_on_resume_is_refused(self):
    workdir = self._new_dir()
    model = DenseFlow(_micro_model(8))
    workdir_lib.write_model_checkpoint(workdir, model)
    wider = _config(model=dataclasses.replace(_micro_model(8), coupling_channels=(16, 16)))
    with self.assertRaisesRegex(train_lib.ConfigError, 'coupling_channels: \\[8, 8\\] in the'):
      train_lib.train(wider, workdir)

  @parameterized.named_parameters(
    ('zero_epsilon', {'adamax_epsilon': 0.0}, '`--adamax_epsilon` must be >= 1.17'),
    ('nan_learning_rate', {'learning_rate': float('nan')}, '`--learning_rate` must be finite'),
    ('inf_finetune_lr', {'finetune_lr': float('inf')}, '`--finetune_lr` must be finite'),
    ('zero_learning_rate', {'learning_rate': 0.0}, '`--learning_rate` must be > 0'),
    ('gamma_above_one', {'lr_decay_gamma': 1.5}, '`--lr_decay_gamma` must be <= 1'),
    ('fractional_steps', {'train_steps': 2.5}, '`--train_steps` must be an integer'),
    ('bool_batch', {'global_batch_size': True}, '`--global_batch_size` must be a number'),
  )
  def test_bad_optimisation_numbers_are_refused_by_name(self, kwargs, message):
    with self.assertRaisesRegex(train_lib.ConfigError, message):
      train_lib.OptimConfig(**kwargs)

  @parameterized.named_parameters(
    ('nan_temperature', {'sample_temperature': float('nan')}, '`--sample_temperature` must be'),
    ('huge_seed', {'seed': 2**64}, '`--seed` must be'),
    ('zero_interval', {'checkpoint_every': 0}, '`--checkpoint_every` must be >= 1'),
    ('negative_count', {'eval_examples': -1}, '`--eval_examples` must be >= 0'),
  )
  def test_bad_run_numbers_are_refused_by_name(self, kwargs, message):
    with self.assertRaisesRegex(train_lib.ConfigError, message):
      _config(**kwargs)

  def test_image_shape_must_match_the_data(self):
    with self.assertRaisesRegex(train_lib.ConfigError, 'does not match the data'):
      _config(model=_micro_model(16))


class KilledRunTest(_TestCase):
  def test_sigkill_then_resume_then_sigterm(self):
    workdir = self._new_dir()
    command = [
      sys.executable,
      '-m',
      'tf_denseflow.train',
      '--flagfile=configs/smoke.cfg',
      f'--workdir={workdir}',
      f'--data_dir={_data_dir()}',
      '--train_steps=100000',
      '--noprogress_bar',
      '--num_grid_samples=0',
      '--eval_examples=0',
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')

    def wait_for_checkpoint(process, at_least):
      deadline = time.time() + 120
      while time.time() < deadline:
        latest = workdir_lib.latest_checkpoint(workdir)
        if latest and int(latest.rsplit('-', 1)[1]) >= at_least:
          return int(latest.rsplit('-', 1)[1])
        self.assertIsNone(process.poll(), 'the run ended early')
        time.sleep(0.2)
      self.fail('no checkpoint')

    first = subprocess.Popen(
      command, cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_for_checkpoint(first, 3)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    killed_at = int(workdir_lib.latest_checkpoint(workdir).rsplit('-', 1)[1])

    second = subprocess.Popen(
      command, cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_checkpoint(second, killed_at + 2)
    second.send_signal(signal.SIGTERM)
    stdout, stderr = second.communicate(timeout=60)
    self.assertEqual(second.returncode, 143, stderr)
    self.assertIn(f'resumed at step {killed_at} ', stdout)
    stopped = int(stdout.split('stopped by SIGTERM at step ')[1].split()[0])
    self.assertIn(f'checkpoint: {workdir}/checkpoints/ckpt-{stopped}', stdout)
    self.assertNotIn('Traceback', stderr)


if __name__ == '__main__':
  tf.test.main()
