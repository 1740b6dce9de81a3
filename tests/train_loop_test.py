"""Tests for tf_denseflow.train_loop.Reporter's bookkeeping of time (a fake clock, no model).

The logged `images_per_s` and the run's `timing` count training time only: the first loop
(tracing), evaluations, checkpoints and samples are booked on their own, so the training
throughput compares with `tf_denseflow.bench`'s step rate (docs/benchmarks.md section 5).
"""

import json
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest

from tf_denseflow import train_loop
from tf_denseflow.optim_config import OptimConfig
from tf_denseflow.train_config import TrainConfig


class _Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


class ReporterTimingTest(absltest.TestCase):
  def _new_dir(self) -> str:
    path = tempfile.mkdtemp(prefix='train_loop_test_')
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def test_training_throughput_leaves_out_first_call_eval_checkpoints_and_samples(self):
    clock = _Clock()
    workdir = self._new_dir()
    config = TrainConfig(optim=OptimConfig(global_batch_size=16), progress_bar=False)
    result = train_loop.TrainResult(step=0, start_step=0)
    with mock.patch.object(train_loop.time, 'time', clock):
      reporter = train_loop.Reporter(config, workdir, result, started=clock.now - 4.0)
      with reporter.timed('first_call'):  # the first loop: one step, 30 s of tracing
        clock.now += 30.0
      reporter.step(8.0, True, timed=False)
      for _ in range(4):  # 4 steps of 16 images, 2 s each
        clock.now += 2.0
        reporter.step(6.0, True)
      with reporter.timed('eval'):
        clock.now += 10.0
      with reporter.timed('checkpoint'):
        clock.now += 1.5
      clock.now += 2.0  # a fifth step
      reporter.step(6.0, False)  # skipped: no loss, but its time is training
      reporter.log_train(6, {'learning_rate': 1e-3, 'grad_norm': 1.0})
      with reporter.timed('sample'):
        clock.now += 0.5
      timing = reporter.log_timing(6)

    self.assertEqual(
      timing,
      {
        'wall_s': 56.0,
        'train_s': 10.0,
        'setup_s': 4.0,
        'first_call_s': 30.0,
        'eval_s': 10.0,
        'checkpoint_s': 1.5,
        'sample_s': 0.5,
        'train_images_per_s': 8.0,  # 5 steps x 16 images / 10 s
      },
    )
    self.assertEqual(result.timing, timing)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    # The window: 5 timed steps in 10 s of training; its loss averages the applied steps,
    # the first loop's included.
    self.assertEqual(records[0]['images_per_s'], 8.0)
    scale = config.model.bits_per_dim_scale
    self.assertAlmostEqual(records[0]['train_bits_per_dim'], (8.0 + 4 * 6.0) / 5 * scale)
    self.assertEqual(records[1], {'step': 6, 'timing': timing})

  def test_a_window_of_first_loop_steps_only_has_no_throughput(self):
    workdir = self._new_dir()
    config = TrainConfig(progress_bar=False)
    reporter = train_loop.Reporter(config, workdir, train_loop.TrainResult(step=0, start_step=0))
    reporter.step(8.0, True, timed=False)
    reporter.log_train(1, {'learning_rate': 1e-3, 'grad_norm': 1.0})
    self.assertIsNone(reporter.timing()['train_images_per_s'])
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      record = json.loads(f.readline())  # strict JSON: no NaN
    self.assertNotIn('images_per_s', record)
    self.assertIn('train_bits_per_dim', record)

  def test_a_window_of_skipped_steps_writes_null_not_nan(self):
    workdir = self._new_dir()
    reporter = train_loop.Reporter(
      TrainConfig(progress_bar=False), workdir, train_loop.TrainResult(step=0, start_step=0)
    )
    reporter.step(float('nan'), False)  # skipped: the window has no applied loss
    reporter.log_train(1, {'learning_rate': 1e-3, 'grad_norm': float('inf')})
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      line = f.readline()
    record = json.loads(line, parse_constant=lambda name: self.fail(f'{name} in {line}'))
    self.assertIsNone(record['train_bits_per_dim'])
    self.assertIsNone(record['grad_norm'])

  def test_an_unknown_kind_is_refused_before_the_body_runs(self):
    reporter = train_loop.Reporter(
      train_loop.TrainConfig(progress_bar=False),
      self._new_dir(),
      train_loop.TrainResult(step=0, start_step=0),
    )
    ran = []
    with self.assertRaisesRegex(ValueError, 'kind'):
      with reporter.timed('evaluation'):
        ran.append(True)
    self.assertEmpty(ran)


class TimingLineTest(absltest.TestCase):
  def test_the_console_line_adds_up_the_timing(self):
    from tf_denseflow import train

    result = train_loop.TrainResult(step=150, start_step=0)
    result.timing = {
      'wall_s': 327.0,
      'train_s': 233.0,
      'setup_s': 0.0,
      'first_call_s': 33.0,
      'eval_s': 59.7,
      'checkpoint_s': 1.3,
      'sample_s': 0.0,
      'train_images_per_s': 10.23,
    }
    self.assertEqual(
      train._timing_line(result),
      'time: 327 s = set-up 0 s + 150 steps 266 s (first call 33 s; then 10.2 images/s) + '
      'evaluation 60 s + checkpoints 1 s + samples 0 s',
    )
    result.timing['train_images_per_s'] = None  # every step in the first loop
    self.assertIn('(first call 33 s)', train._timing_line(result))


if __name__ == '__main__':
  absltest.main()
