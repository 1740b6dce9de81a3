"""Where a run trains: the distribution strategy, the worker's place in a cluster, bounded waits.

```
--strategy=auto          multi_worker when TF_CONFIG names a cluster (or a Slurm job has several
                         tasks), else mirrored
--strategy=mirrored      MirroredStrategy: all local GPUs, else the CPU (or --num_cpu_devices
                         logical CPUs)
--strategy=one_device    OneDeviceStrategy on the first GPU, else the CPU
--strategy=multi_worker  MultiWorkerMirroredStrategy configured by TF_CONFIG (Keras, TFX and
                         Kubernetes operators write it) or, without TF_CONFIG, by Slurm's
                         environment (`tf.distribute.cluster_resolver.SlurmClusterResolver`)
```

Multi-worker conventions (TensorFlow's, as Keras's `BackupAndRestore` and the MWMS tutorial
use them): the chief (task `chief:0`, or `worker:0` when the cluster has no chief) writes the
run directory; every other worker takes part in every collective, checkpoint saves included,
but writes its checkpoint to `<checkpoint dir>/workertemp_<task id>` and removes it at once
(`write_dir`, `remove_write_dir`).

Waits are bounded (docs/distributed.md):
- Start-up: `MultiWorkerMirroredStrategy()` blocks inside TensorFlow's C++ runtime (holding the
  GIL) until every worker is up; `bounded_wait` runs a watchdog process that prints one
  `error:` line and kills this worker after `cluster_wait_s`.
- A worker that dies: TensorFlow's coordination service notices the missing heartbeats (about
  10 s) or the closed connection and aborts the collectives of every other worker with an
  `UnavailableError`, which `train_lib` turns into one clear message (`WorkerLostError`).
- A worker that hangs without dying: every collective of the training step times out after
  `collective_timeout_s` (`tf.distribute.experimental.CommunicationOptions`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import weakref
from typing import Iterator, Optional, Sequence

import tensorflow as tf

__all__ = [
  'STRATEGIES',
  'WorkerInfo',
  'agree',
  'any_worker',
  'bounded_wait',
  'broadcast_from_chief',
  'cluster_resolver',
  'make_strategy',
  'mirrored_strategy',
  'remove_write_dir',
  'worker_info',
  'write_dir',
]

STRATEGIES = ('auto', 'mirrored', 'one_device', 'multi_worker')


class ClusterError(ValueError):
  """The cluster settings cannot work (bad TF_CONFIG, a strategy that needs a cluster)."""


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
  """This process's place in the run.

  Attributes:
    task_type: 'chief' or 'worker' ('worker' for single-machine strategies).
    task_id: index of the task within its type.
    num_workers: processes in the run (1 for single-machine strategies).
    is_chief: whether this process writes the run directory.
  """

  task_type: str = 'worker'
  task_id: int = 0
  num_workers: int = 1
  is_chief: bool = True

  @property
  def name(self) -> str:
    return f'{self.task_type}:{self.task_id}'


# -------------------------------------------------------------------------------------------------
# The strategy.


def _tf_config() -> dict:
  raw = os.environ.get('TF_CONFIG', '')
  if not raw.strip():
    return {}
  try:
    parsed = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ClusterError(f'TF_CONFIG is not JSON ({e}).') from None
  if not isinstance(parsed, dict):
    raise ClusterError('TF_CONFIG must be a JSON object with "cluster" and "task".')
  cluster = parsed.get('cluster') or {}
  task = parsed.get('task') or {}
  if cluster:
    jobs = {k: v for k, v in cluster.items() if k in ('chief', 'worker')}
    if not jobs or not all(isinstance(v, list) and v for v in jobs.values()):
      raise ClusterError(
        f'TF_CONFIG: "cluster" needs a non-empty "worker" (and optionally "chief") address '
        f'list, got {sorted(cluster)}.'
      )
    kind, index = task.get('type'), task.get('index')
    if kind not in jobs or not isinstance(index, int) or not 0 <= index < len(jobs[kind]):
      raise ClusterError(
        f'TF_CONFIG: "task" must name one of the cluster\'s tasks ({_tasks(jobs)}), got {task}.'
      )
  return parsed


def _tasks(jobs: dict) -> str:
  return ', '.join(f'{k}:0..{len(v) - 1}' for k, v in sorted(jobs.items()))


def _slurm_tasks() -> int:
  try:
    return int(os.environ.get('SLURM_NTASKS', '0')) if os.environ.get('SLURM_JOB_ID') else 0
  except ValueError:
    return 0


def cluster_resolver() -> Optional[tf.distribute.cluster_resolver.ClusterResolver]:
  """TF_CONFIG's cluster, else a Slurm job's (more than one task), else None.

  Raises:
    ClusterError: TF_CONFIG is set but malformed.
  """
  if _tf_config().get('cluster'):
    return tf.distribute.cluster_resolver.TFConfigClusterResolver()
  if _slurm_tasks() > 1:
    return tf.distribute.cluster_resolver.SlurmClusterResolver()
  return None


def make_strategy(
  kind: str = 'auto',
  num_cpu_devices: int = 0,
  *,
  cluster_wait_s: int = 600,
  collective_timeout_s: int = 1800,
) -> tf.distribute.Strategy:
  """The run's `tf.distribute.Strategy` (see the module docstring for `kind`).

  Args:
    kind: one of `STRATEGIES`.
    num_cpu_devices: with 'mirrored' (or 'auto' without a cluster), replicate over this many
      logical CPUs (`train_lib.configure_cpu_devices` must have split the CPU first).
    cluster_wait_s: multi-worker: seconds to wait for every worker at start-up.
    collective_timeout_s: multi-worker: seconds a collective may wait for the other workers
      (0: no limit).

  Raises:
    ClusterError: an unknown kind, multi_worker without a cluster, --num_cpu_devices with a
      multi-worker or one-device strategy, fewer logical CPUs than requested.
  """
  if kind not in STRATEGIES:
    raise ClusterError(f'--strategy={kind!r}: expected one of {", ".join(STRATEGIES)}.')
  resolver = cluster_resolver() if kind in ('auto', 'multi_worker') else None
  if kind == 'auto':
    kind = 'multi_worker' if resolver is not None else 'mirrored'
  if kind == 'multi_worker':
    if resolver is None:
      raise ClusterError(
        '--strategy=multi_worker needs a cluster: set TF_CONFIG (docs/distributed.md) or run '
        'in a Slurm job with several tasks.'
      )
    if num_cpu_devices > 1:
      raise ClusterError(
        f'--num_cpu_devices={num_cpu_devices} cannot be combined with multi-worker training '
        '(each worker trains on its GPUs, or on one CPU).'
      )
    spec = resolver.cluster_spec().as_dict()
    count = sum(len(spec.get(job, [])) for job in ('chief', 'worker'))
    options = tf.distribute.experimental.CommunicationOptions(
      timeout_seconds=collective_timeout_s or None
    )
    task = f'{resolver.task_type}:{resolver.task_id}'
    with bounded_wait(
      cluster_wait_s,
      f'{task}: the {count} workers of the cluster were not all up within --cluster_wait_s='
      f'{cluster_wait_s} s (addresses: {spec}); start every worker, or raise the limit.',
    ):
      return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=options
      )
  if kind == 'one_device':
    if num_cpu_devices > 1:
      raise ClusterError(
        f'--num_cpu_devices={num_cpu_devices} cannot be combined with --strategy=one_device.'
      )
    gpus = tf.config.list_logical_devices('GPU')
    return tf.distribute.OneDeviceStrategy((gpus or tf.config.list_logical_devices('CPU'))[0].name)
  if num_cpu_devices > 0:
    cpus = tf.config.list_logical_devices('CPU')
    if len(cpus) < num_cpu_devices:
      raise ClusterError(
        f'--num_cpu_devices={num_cpu_devices} but only {len(cpus)} logical CPU(s) exist.'
      )
    return mirrored_strategy([d.name for d in cpus[:num_cpu_devices]])
  gpus = tf.config.list_logical_devices('GPU')
  if gpus:
    return mirrored_strategy([d.name for d in gpus])
  return mirrored_strategy([tf.config.list_logical_devices('CPU')[0].name])


def mirrored_strategy(devices: Sequence[str]) -> tf.distribute.MirroredStrategy:
  """`tf.distribute.MirroredStrategy(devices)` whose collectives cannot collide with another's.

  TensorFlow caches every collective by (group key, instance key), and each new
  MirroredStrategy numbers its collectives from the same start: a second strategy over the same
  devices in one process (a second `train_lib.train` call, a notebook, a test suite) then fails
  with "Shape mismatch in the collective instance N" as soon as one of its all-reduces has
  another shape than the first strategy's N-th. Every strategy made here starts its keys past
  the previous one's (`_collective_key_base`, the private switch TensorFlow's own tests use for
  this; guarded by tests/multi_worker_test.py::test_two_strategies_in_one_process_do_not_collide).
  """
  cls = tf.distribute.MirroredStrategy
  if hasattr(cls, '_collective_key_base'):
    cls._collective_key_base += 100_000
  return cls(list(devices))


def worker_info(strategy: tf.distribute.Strategy) -> WorkerInfo:
  """This process's task, the number of workers, and whether it is the chief."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
    return WorkerInfo()
  spec = resolver.cluster_spec().as_dict()
  task_type, task_id = resolver.task_type or 'worker', int(resolver.task_id or 0)
  num_workers = sum(len(spec.get(job, [])) for job in ('chief', 'worker'))
  chief = task_type == 'chief' or (task_type == 'worker' and task_id == 0 and 'chief' not in spec)
  return WorkerInfo(task_type, task_id, max(num_workers, 1), chief)


# -------------------------------------------------------------------------------------------------
# Collective helpers (every worker must call them, in the same order).


_SUM_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sum_over_replicas(strategy: tf.distribute.Strategy, value: tf.Tensor) -> tf.Tensor:
  """SUM over every replica of every worker of `value` (float64 `[2]`), in one traced function."""
  if strategy not in _SUM_FUNCTIONS:

    @tf.function(autograph=False)
    def sum_fn(x):
      per_replica = strategy.run(tf.identity, args=(x,))
      return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    _SUM_FUNCTIONS[strategy] = sum_fn
  return _SUM_FUNCTIONS[strategy](value)


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
  """Whether `flag` is true on any worker (one all-reduce; every worker gets the same answer)."""
  if worker_info(strategy).num_workers == 1:
    return bool(flag)
  total = _sum_over_replicas(strategy, tf.constant([1.0 if flag else 0.0, 0.0], tf.float64))
  return float(total[0]) > 0


def agree(strategy: tf.distribute.Strategy, value: float) -> bool:
  """Whether every worker passed the same `value` (every worker gets the same answer).

  Compares sum and sum of squares over the replicas: `(sum v)^2 == n * sum v^2` exactly when all
  `n` values are equal (Cauchy-Schwarz), so no worker can see agreement where another does not.
  """
  if worker_info(strategy).num_workers == 1:
    return True
  v = tf.constant([float(value), float(value) ** 2], tf.float64)
  sums = _sum_over_replicas(strategy, v).numpy()
  n = strategy.num_replicas_in_sync
  return bool(sums[0] ** 2 == n * sums[1])


def broadcast_from_chief(
  strategy: tf.distribute.Strategy, variables: Sequence[tf.Variable]
) -> None:
  """Gives every worker the chief's values of `variables` (floating point, mirrored).

  One all-reduce: replica 0 (on the chief) contributes its values, every other replica zeros,
  so the sum is the chief's value exactly. Used after ActNorm's data-dependent initialisation,
  which every worker computes on its own (the same batch, but possibly another CPU kind).
  """
  if worker_info(strategy).num_workers == 1 or not variables:
    return
  variables = [v for v in variables if tf.as_dtype(v.dtype).is_floating]

  def replica_fn():
    ctx = tf.distribute.get_replica_context()
    keep = tf.equal(ctx.replica_id_in_sync_group, 0)
    values = [tf.where(keep, tf.identity(v), tf.zeros_like(v)) for v in variables]
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)

  @tf.function(autograph=False)
  def sync():
    summed = strategy.run(replica_fn)
    for var, value in zip(variables, summed):
      var.assign(strategy.experimental_local_results(value)[0])

  sync()


# -------------------------------------------------------------------------------------------------
# Files.


def write_dir(directory: str, info: WorkerInfo) -> str:
  """Where this worker writes what the chief writes to `directory` (TF's convention)."""
  if info.is_chief:
    return directory
  return os.path.join(directory, f'workertemp_{info.task_id}')


def remove_write_dir(directory: str, info: WorkerInfo) -> None:
  """Removes a non-chief worker's temporary `write_dir` (nothing for the chief)."""
  if not info.is_chief:
    path = write_dir(directory, info)
    if tf.io.gfile.exists(path):
      tf.io.gfile.rmtree(path)


# -------------------------------------------------------------------------------------------------
# Bounded waits.

# The watchdog: a separate process, because the wait it bounds holds the GIL inside TensorFlow's
# C++ runtime (no Python thread or signal handler of this process runs until it returns).
_WATCHDOG = r"""
import os, select, signal, sys
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], seconds)
if not ready:
  sys.stderr.write('error: ' + message + '\n')
  sys.stderr.flush()
  os.kill(pid, signal.SIGKILL)
"""


@contextlib.contextmanager
def bounded_wait(seconds: float, message: str) -> Iterator[None]:
  """Kills this process, after printing `error: <message>`, if the block lasts over `seconds`.

  The process exits by SIGKILL (status 137 from a shell); 0 or less waits without a limit.
  """
  if not seconds or seconds <= 0:
    yield
    return
  watchdog = subprocess.Popen(
    [sys.executable, '-c', _WATCHDOG, str(os.getpid()), str(float(seconds)), message],
    stdin=subprocess.PIPE,
  )
  try:
    yield
  finally:
    watchdog.stdin.close()  # end of the wait: the watchdog wakes up and exits
    try:
      watchdog.wait(timeout=10)
    except subprocess.TimeoutExpired:
      watchdog.kill()
