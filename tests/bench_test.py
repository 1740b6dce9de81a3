"""The benchmark entry point: one tiny run through the CLI, checking the JSON it writes.

No timing assertions: CI machines are shared, so the numbers mean nothing here.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import cli_testlib
import pytest
import tensorflow as tf

from tf_denseflow import bench


class BenchTest(tf.test.TestCase):
  def _run_tiny_bench(self, *extra: str, subdir: bool = False):
    """`python -m tf_denseflow.bench` on the tiny preset (one timed call); its output and JSON."""
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    path = os.path.join(tmp, 'sub', 'bench.json') if subdir else os.path.join(tmp, 'bench.json')
    tiny = ['--preset=tiny', '--image_size=16', '--batch_size=2', '--steps=1', '--warmup=1']
    result = subprocess.run(
      [sys.executable, '-m', 'tf_denseflow.bench', *tiny, *extra, f'--json={path}'],
      capture_output=True,
      text=True,
      timeout=600,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(path) as f:
      return result, json.load(f)

  def test_tiny_run_writes_every_key(self):
    result, out = self._run_tiny_bench(subdir=True)
    self.assertIn('img/s', result.stdout)
    for key in (
      'train',
      'eval',
      'sample',
      'peak_rss_mb',
      'params',
      'config',
      'gflop_per_image',
      'sgemm_gflop_s',
    ):
      self.assertIn(key, out)
    for phase in ('train', 'eval', 'sample'):
      self.assertNotIn('error', out[phase])
      for key in ('img_s', 'step_s', 'step_s_all', 'first_call_s'):
        self.assertIn(key, out[phase])
      self.assertGreater(out[phase]['img_s'], 0.0)
      self.assertLen(out[phase]['step_s_all'], 1)
    # One process: each phase's peak is the process's when it ended, so they never go down.
    peaks = [out[phase]['peak_rss_mb'] for phase in ('train', 'eval', 'sample')]
    self.assertEqual(peaks, sorted(peaks))
    self.assertLessEqual(peaks[-1], out['peak_rss_mb'])
    self.assertGreater(peaks[0], 0.0)
    self.assertIn("the process's peak when it ended", result.stdout)
    self.assertEqual(out['params'], 75_532)
    self.assertEqual(out['config']['image_shape'], [16, 16, 3])
    self.assertEqual(out['preset'], 'tiny')
    # --grappler=auto: TensorFlow's default for eval and sample, the training step without it
    # on the CPU kernels, as `train` calls it.
    self.assertEqual(
      (out['grappler'], out['grappler_train'], out['grappler_train_networks']), ('on', 'off', 'on')
    )
    self.assertIn('grappler=on (train step: off, its networks: on)', result.stdout)
    self.assertGreater(out['peak_rss_mb'], 0.0)
    self.assertGreater(out['sgemm_gflop_s'], 0.0)
    self.assertIn('2048^3 fp32 matmul', result.stdout)
    flops = out['gflop_per_image']
    self.assertGreater(flops['eval'], 0.0)
    self.assertAllClose(flops['train'], 3.0 * flops['eval'])
    self.assertIn('profiler', flops['source'])

  def test_flops_include_the_shared_network_functions(self):
    # The profiler counts one graph's ops: with the networks as shared function calls it missed
    # their FLOPs (session 5 to 6: `small`'s train step was reported at 0.399 GFLOP/image
    # instead of 3 x 4.647). `count_flops` traces with the networks inlined.
    from tf_denseflow.bench_phases import count_flops
    from tf_denseflow.model import DenseFlow
    from tf_denseflow.nn import shared_function

    model = DenseFlow(bench.make_config('tiny', 16, 'float32'), seed=0)
    images = tf.zeros([2, 16, 16, 3], tf.uint8)
    model.initialize(images)
    seed = tf.constant([0, 1], tf.int64)

    def elbo(x, s):
      return model.elbo(x, s)

    counted = count_flops(elbo, images, seed)
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()

    def profiled(share):
      with shared_function.sharing(share):
        graph = tf.function(elbo, autograph=False).get_concrete_function(images, seed).graph
      return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops

    self.assertEqual(counted, profiled(False))
    self.assertGreater(counted, 2 * profiled(True))  # the networks are most of the FLOPs

  @pytest.mark.slow  # 30 s; float16 training itself is covered by tests/precision_test.py
  def test_float16_library_kernels_train_phase_only(self):
    result, out = self._run_tiny_bench(
      '--precision=float16',
      '--conv_kernels=library',
      '--phases=train',
      '--nocount_flops',
      f'--timing_lock={os.path.join(self.get_temp_dir(), "lock")}',
    )
    self.assertEqual(out['config']['coupling_dtype'], 'float16')
    self.assertEqual((out['conv_kernels'], out['conv_kernels_resolved']), ('library', 'library'))
    self.assertEqual(out['eval'], {'skipped': True})
    self.assertEqual(out['sample'], {'skipped': True})
    for key in ('step_s', 'img_s', 'trace_s', 'first_call_s', 'lock_wait_s'):
      self.assertIn(key, out['train'])
    # The dynamic loss scale starts at 2**15 and only halves (overflows) in 2 steps.
    self.assertLessEqual(out['loss_scale'], 2.0**15)
    self.assertEqual(out['loss_scale'] * 2 ** out['train_skipped_steps'], 2.0**15)

  def test_isolated_phases_each_in_a_process_of_its_own(self):
    result, out = self._run_tiny_bench(
      '--phases=eval,sample', '--isolate_phases', '--grappler=off', '--precision=bfloat16'
    )
    self.assertIn('each phase in a process of its own', result.stdout)
    self.assertTrue(out['isolated_phases'])
    self.assertEqual(out['grappler'], 'off')  # the phases' processes get every flag
    self.assertEqual(out['config']['coupling_dtype'], 'bfloat16')  # --precision, resolved
    self.assertEqual(out['train'], {'skipped': True})
    peaks = [out[phase]['peak_rss_mb'] for phase in ('eval', 'sample')]
    self.assertGreaterEqual(out['peak_rss_mb'], max(peaks))  # the FLOP count comes after
    self.assertGreater(min(peaks), 0.0)
    # The FLOP counts come from the eval phase's process and price the sample phase too.
    flops = out['gflop_per_image']
    self.assertAllClose(out['sample']['gflop_s'], flops['sample'] * out['sample']['img_s'])
    self.assertEqual(out['params'], 75_532)

  def test_isolated_phases_report_a_process_that_wrote_nothing(self):
    # Each phase's process fails its flag check (before any model is built): no result at all
    # is an error naming the flag, not an empty table.
    with self.assertRaisesRegex(RuntimeError, r'status 2: error: .*--image_size=12'):
      bench.run_isolated(['--preset=tiny', '--image_size=12', ''], ['eval', 'sample'])

  def test_table_shows_failed_phases(self):
    result = {
      'config': {'image_shape': [8, 8, 3], 'coupling_dtype': 'float32'},
      'batch_size': 2,
      'params': 10,
      'jit_compile': True,
      'peak_rss_mb': 1.0,
      'gflop_per_image': None,
      'train': {'error': 'InvalidArgumentError: Detected unsupported operations'},
      'eval': {'step_s': 0.5, 'img_s': 4.0, 'first_call_s': 1.0},
      'sample': {'step_s': 0.25, 'img_s': 8.0},
    }
    table = bench.format_table(result, 'tiny')
    self.assertIn('train     failed: InvalidArgumentError', table)
    self.assertRegex(table, r'eval\s+0\.5000\s+4\.0')

  def test_bad_input_through_main_fails_with_one_line(self):
    # The parser and main of `python -m tf_denseflow.bench`, as app.run calls them; every case
    # stops before a model is built.
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    a_file = os.path.join(tmp, 'a_file')
    open(a_file, 'w').close()
    cases = {
      'zero batch': (['--batch_size=0'], '--batch_size'),
      'steps not a number': (['--steps=ten'], '--steps'),
      'negative seed': (['--seed=-1'], '--seed'),
      'int32 warmup': (['--warmup=2147483648'], '--warmup'),
      'indivisible image': (['--preset=tiny', '--image_size=12'], '--image_size=12'),
      'json is a directory': ([f'--json={tmp}'], f'--json={tmp}'),
      'json under a file': ([f'--json={a_file}/x.json'], f'--json={a_file}/x.json'),
      'unknown phase': (['--phases=train,backward'], '--phases=train,backward'),
      'precision disagrees': (
        ['--precision=float16', '--coupling_dtype=bfloat16'],
        '--precision=float16 and --coupling_dtype=bfloat16',
      ),
      'unknown kernels': (['--conv_kernels=cudnn'], '--conv_kernels'),
      'unknown grappler setting': (['--grappler=sometimes'], '--grappler'),
    }
    results = cli_testlib.run_cases(
      'tf_denseflow.bench:define_bench_flags',
      'tf_denseflow.flags:parse_flags',
      'tf_denseflow.bench:main',
      [args for args, _ in cases.values()],
    )
    for (name, (_, needle)), result in zip(cases.items(), results):
      with self.subTest(name):
        cli_testlib.assert_one_line_error(self, result, needle)


if __name__ == '__main__':
  tf.test.main()
