"""Multi-worker training: worker processes on 127.0.0.1 against one process with as many replicas.

Every worker is `python -m tf_denseflow.train` with its own TF_CONFIG (free ports on 127.0.0.1,
one CPU device each); every wait is bounded (subprocess timeouts, `--cluster_wait_s`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import cli_testlib
import pytest
import tensorflow as tf
from absl.testing import absltest, parameterized

from tf_denseflow import cluster

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SMOKE = ['--flagfile=configs/smoke.cfg', '--noprogress_bar']
_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
_ENV.pop('TF_CONFIG', None)


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _tf_config(ports, index):
  workers = [f'127.0.0.1:{p}' for p in ports]
  return json.dumps({'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': index}})


def _start(workdir, args, tf_config=None):
  env = dict(_ENV)
  if tf_config is not None:
    env['TF_CONFIG'] = tf_config
  return subprocess.Popen(
    [sys.executable, '-m', 'tf_denseflow.train', *_SMOKE, f'--workdir={workdir}', *args],
    cwd=_REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _finish(proc, timeout=300):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    # Both streams: the program's stdout says where it was (resumed, stopped, the time: line).
    raise AssertionError(f'timed out:\n{out[-2000:]}\n{err[-3000:]}') from None
  return proc.returncode, out, err


def _run_workers(workdir, count, args, timeout=300):
  ports = _free_ports(count)
  procs = [_start(workdir, args, _tf_config(ports, i)) for i in range(count)]
  return [_finish(p, timeout) for p in procs]


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _wait_for_step(workdir, step, procs, timeout=400, skip=0):
  """Waits (bounded) until the chief has logged `step`; False if a process ended first.

  `skip`: records already in metrics.jsonl (an earlier run's) that do not count.
  """
  deadline = time.time() + timeout
  path = os.path.join(workdir, 'metrics.jsonl')
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(path) and any(r['step'] >= step for r in _metrics(workdir)[skip:]):
      return True
    time.sleep(0.3)
  for p in procs:
    if p.poll() is None:
      p.kill()
  return False


def _latest_step(workdir):
  with open(os.path.join(workdir, 'checkpoints', 'checkpoint')) as f:
    return int(f.readline().split('ckpt-')[1].strip().strip('"'))


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith('error: ')]


class MultiWorkerTest(parameterized.TestCase):
  def _check_equal_to_replicas(self, count, args):
    root = tempfile.mkdtemp()
    workdir, reference = os.path.join(root, 'workers'), os.path.join(root, 'replicas')
    results = _run_workers(workdir, count, args)
    for i, (code, _, err) in enumerate(results):
      self.assertEqual(code, 0, f'worker {i}:\n{err[-3000:]}')
    self.assertIn(f'{count} workers; this one, worker:0 (chief)', results[0][1])
    self.assertIn('not the chief', results[1][1])
    code, _, err = _finish(_start(reference, [*args, f'--num_cpu_devices={count}']))
    self.assertEqual(code, 0, err[-3000:])

    got, want = _metrics(workdir), _metrics(reference)
    self.assertLen(got, len(want))
    for g, w in zip(got, want):
      self.assertEqual(g['step'], w['step'])
      for key in ('train_bits_per_dim', 'grad_norm'):
        if key in w:  # the same examples, noise and per-replica batch-norm statistics
          self.assertAlmostEqual(g[key], w[key], delta=1e-6 * abs(w[key]), msg=key)
      if 'eval_bits_per_dim' in w:  # sums over workers in another order
        self.assertAlmostEqual(g['eval_bits_per_dim'], w['eval_bits_per_dim'], delta=1e-5)
    # One checkpoint series, written by the chief; nothing left by the other workers.
    files = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
    self.assertEqual(files, sorted(os.listdir(os.path.join(reference, 'checkpoints'))))
    self.assertLen(os.listdir(os.path.join(workdir, 'tb')), 1)
    self.assertTrue(os.path.exists(os.path.join(workdir, 'samples_step2.png')))

  def test_two_workers_equal_one_process_with_two_replicas(self):
    self._check_equal_to_replicas(2, [])

  @pytest.mark.slow  # four TF processes on 2 cores: about 2 minutes
  def test_three_workers_equal_one_process_with_three_replicas(self):
    self._check_equal_to_replicas(3, ['--global_batch_size=6', '--eval_batch_size=6'])

  def test_killed_worker_stops_the_job_a_restart_resumes_sigterm_stops_all(self):
    workdir = os.path.join(tempfile.mkdtemp(), 'run')
    args = ['--train_steps=400', '--checkpoint_every=3', '--num_grid_samples=0']
    ports = _free_ports(2)
    chief = _start(workdir, args, _tf_config(ports, 0))
    other = _start(workdir, args, _tf_config(ports, 1))
    self.assertTrue(_wait_for_step(workdir, 4, [chief, other]))  # a checkpoint at step 3
    other.send_signal(signal.SIGKILL)
    _finish(other, 30)
    start = time.time()
    code, _, err = _finish(chief, timeout=120)
    lost_after = time.time() - start
    self.assertEqual(code, 1, err[-3000:])
    errors = _error_lines(err)
    self.assertLen(errors, 1, err[-3000:])
    self.assertIn('the cluster lost a worker', errors[0])
    self.assertIn('Restart every worker', errors[0])
    self.assertLess(lost_after, 90)

    latest = _latest_step(workdir)
    self.assertGreaterEqual(latest, 3)
    # Restart both: they resume there; a SIGTERM to the non-chief stops both after one step.
    earlier = len(_metrics(workdir))  # the first run's records, counted before the restart
    ports = _free_ports(2)
    chief = _start(workdir, args, _tf_config(ports, 0))
    other = _start(workdir, args, _tf_config(ports, 1))
    # SIGTERM only once both train: TF's coordination service swallows it during start-up. The
    # first run may have logged step latest + 2 before it died: only this run's records count
    # (a flake once, when the SIGTERM came during start-up and both trained on towards step 400).
    self.assertTrue(_wait_for_step(workdir, latest + 2, [chief, other], skip=earlier))
    other.send_signal(signal.SIGTERM)
    results = [_finish(chief, 120), _finish(other, 120)]
    for i, (code, out, err) in enumerate(results):
      self.assertEqual(code, 143, f'worker {i}:\n{err[-3000:]}')
      self.assertIn(f'resumed at step {latest}', out)
    stopped = [
      int(out.split('stopped by ')[1].split(' at step ')[1].split()[0]) for _, out, _ in results
    ]
    self.assertEqual(stopped[0], stopped[1])
    self.assertGreater(stopped[0], latest)
    self.assertEqual(_latest_step(workdir), stopped[0])  # the chief saved where both stopped
    self.assertEqual(os.listdir(os.path.join(workdir, 'checkpoints')).count('workertemp_1'), 0)

  def test_a_missing_worker_ends_the_wait_with_one_error_line(self):
    workdir = os.path.join(tempfile.mkdtemp(), 'run')
    proc = _start(workdir, ['--cluster_wait_s=5'], _tf_config(_free_ports(2), 0))
    code, _, err = _finish(proc, timeout=120)
    self.assertEqual(code, -signal.SIGKILL, err[-3000:])
    errors = _error_lines(err)
    self.assertLen(errors, 1, err[-3000:])
    self.assertIn('were not all up within --cluster_wait_s=5 s', errors[0])

  @parameterized.parameters(
    ('{"cluster": ', 'TF_CONFIG is not JSON'),
    ('{"cluster": {"worker": []}, "task": {}}', 'non-empty "worker"'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}', 'task'),
  )
  def test_bad_tf_config_is_refused_by_name(self, tf_config, message):
    os.environ['TF_CONFIG'] = tf_config
    try:
      with self.assertRaisesRegex(cluster.ClusterError, message):
        cluster.make_strategy('auto')
    finally:
      del os.environ['TF_CONFIG']

  def test_train_answers_a_bad_tf_config_with_one_line_and_exit_2(self):
    os.environ['TF_CONFIG'] = '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"index": 5}}'
    try:
      results = cli_testlib.run_cases(
        'tf_denseflow.flags:define_flags',
        'tf_denseflow.train:_parse',
        'tf_denseflow.train:main',
        [_SMOKE + ['--workdir=/tmp/unused_multi_worker_test']],
      )
    finally:
      del os.environ['TF_CONFIG']
    cli_testlib.assert_one_line_error(self, results[0], 'TF_CONFIG: "task" must name')

  def test_two_strategies_in_one_process_do_not_collide(self):
    # Without fresh collective keys the second strategy's all-reduce of another shape fails
    # with "Shape mismatch in the collective instance 1" (TF caches collectives by key).
    for size in (3, 5):
      strategy = cluster.make_strategy('mirrored', 2)

      @tf.function
      def all_reduce(strategy=strategy, size=size):
        ctx = lambda: tf.distribute.get_replica_context()  # noqa: E731
        return strategy.run(lambda: ctx().all_reduce('SUM', tf.ones([size])))

      out = strategy.experimental_local_results(all_reduce())
      self.assertEqual([list(x.numpy()) for x in out], [[2.0] * size] * 2)

  def test_multi_worker_without_a_cluster_is_refused(self):
    with self.assertRaisesRegex(cluster.ClusterError, 'needs a cluster'):
      cluster.make_strategy('multi_worker')


if __name__ == '__main__':
  absltest.main()
