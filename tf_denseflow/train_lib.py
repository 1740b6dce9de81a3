"""DenseFlow training under a `tf.distribute` strategy: the set-up (settings: train_config.py).

`train(config, workdir)` runs the official recipe (Adamax, linear warm-up, then a constant or
exponentially decaying learning rate, then a constant fine-tune stage) on every visible GPU, or on
the CPU (optionally split into `num_cpu_devices` logical devices), or on the workers of a
`TF_CONFIG` cluster (`--strategy`, `cluster.py`, docs/distributed.md: only the chief writes), and
leaves in `workdir` the files of `workdir.py`'s layout:
```
WORKDIR/model_config.json      the architecture (checked on resume)
WORKDIR/train_config.json      every setting of the run (evaluate/sample read the dataset here)
WORKDIR/checkpoints/ckpt-N     tf.train.Checkpoint(model, optimizer, step, nonfinite_steps,
                                                   model_config)
WORKDIR/tb/                    TensorBoard scalars and sample grids
WORKDIR/metrics.jsonl          one JSON line per log/eval point (step, wall-clock, bits_per_dim),
                               and one `timing` line per process at its end
WORKDIR/samples_stepN.png      the final sample grid
```

Who does what (orbit's seams):
```
train_lib.train      this loop: the cadence of logging, evaluation, checkpoints and samples, the
                     non-finite streak, SIGTERM and Ctrl-C
trainer.Trainer      strategy, model, optimizer, checkpoint; train(num_steps) runs num_steps
                     steps in one tf.function call (--steps_per_loop), evaluate(), draw_samples()
train_step           one step: per-replica loss and gradient, one all-reduce, a guarded update
```

The step (DESIGN.md section 6):
```
nll   = -elbo(images, noise)                      # [per-replica batch], nats, training=True
loss  = compute_average_loss(nll, global_batch)   # SUM over replicas = global mean
grads = all_reduce(SUM, d loss / d weights)       # once; checked, measured, then applied
update if the step is safe (finite loss, gradients and BN statistics, an update that cannot
overflow), else skip it and count it (BN running statistics only assigned on update)
```

Randomness is stateless (`seeds.py`). The step's seed is `fold_in((seed, 1), step)`, and the
noise of example `j` of a global batch does not depend on the replica count
(`noise_seeding='global_batch'`, see `replica_loss.py`). The data stream is a pure function of
`(dataset, seed, global batch)`, and a resumed run restarts it at the exact batch
(`make_train_dataset(skip_batches=...)`), so an interrupted and resumed run computes the same
steps as an uninterrupted one. With `--steps_per_loop=n` the steps are the same; logging,
evaluation, checkpoints, samples and the callback happen at the end of the loop in which their
interval falls (intervals rounded up to whole loops).

Batch norm: in training mode the coupling networks normalise with the statistics of the
per-replica batch (no cross-replica sync, as PyTorch's DataParallel/DDP without SyncBatchNorm), so
with more than one replica the loss equals the mean of the per-replica losses, not the loss of the
global batch on one device; the two agree at initialisation (zero-initialised coupling outputs) and
in evaluation mode (running statistics).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, Iterator, Optional

import tensorflow as tf
from absl import logging

from tf_denseflow import cluster, grappler, kernels, summaries, train_loop
from tf_denseflow import data as data_lib
from tf_denseflow import workdir as workdir_lib
from tf_denseflow.model import DenseFlow
from tf_denseflow.replica_loss import (  # noqa: F401 -- re-exported
  negative_elbo,
  nll_given_noise,
  replica_noise,
)
from tf_denseflow.seeds import step_seed  # noqa: F401 -- re-exported
from tf_denseflow.train_config import (  # noqa: F401 -- re-exported: the public training API
  METRICS_FILE,
  TB_SUBDIR,
  TRAIN_CONFIG_FILE,
  ConfigError,
  OptimConfig,
  TrainConfig,
  TrainingError,
  WarmupSchedule,
  WorkerLostError,
  data_config_from_json,
  load_train_config,
  model_config_from_flags,
)
from tf_denseflow.train_loop import TrainResult
from tf_denseflow.trainer import Trainer  # noqa: F401 -- re-exported

__all__ = [
  'ConfigError',
  'METRICS_FILE',
  'OptimConfig',
  'TB_SUBDIR',
  'TRAIN_CONFIG_FILE',
  'TrainConfig',
  'TrainResult',
  'Trainer',
  'TrainingError',
  'WarmupSchedule',
  'WorkerLostError',
  'configure_cpu_devices',
  'data_config_from_json',
  'load_train_config',
  'make_strategy',
  'model_config_from_flags',
  'negative_elbo',
  'nll_given_noise',
  'replica_noise',
  'step_seed',
  'train',
]


# -------------------------------------------------------------------------------------------------
# Devices.


def configure_cpu_devices(num_devices: int) -> None:
  """Splits the CPU into `num_devices` logical devices (before TensorFlow initialises).

  Raises:
    ConfigError: TensorFlow is already initialised with fewer logical CPUs.
  """
  if num_devices <= 1:
    return
  cpus = tf.config.list_physical_devices('CPU')
  try:
    tf.config.set_logical_device_configuration(
      cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices
    )
  except RuntimeError:
    available = len(tf.config.list_logical_devices('CPU'))
    if available < num_devices:
      raise ConfigError(
        f'--num_cpu_devices={num_devices}: TensorFlow is already initialised with {available} '
        'logical CPU device(s); set it before any TensorFlow operation runs.'
      ) from None


def make_strategy(
  num_cpu_devices: int = 0,
  kind: str = 'mirrored',
  *,
  cluster_wait_s: int = 600,
  collective_timeout_s: int = 1800,
) -> tf.distribute.Strategy:
  """The run's strategy (`cluster.make_strategy`): by default MirroredStrategy over
  `num_cpu_devices` logical CPUs, else all GPUs, else the CPU.

  Raises:
    ConfigError: the strategy cannot be built (fewer logical CPUs than requested, a bad
      TF_CONFIG, multi_worker without a cluster).
  """
  try:
    if num_cpu_devices > 0 and kind in ('auto', 'mirrored'):
      configure_cpu_devices(num_cpu_devices)
    return cluster.make_strategy(
      kind,
      num_cpu_devices,
      cluster_wait_s=cluster_wait_s,
      collective_timeout_s=collective_timeout_s,
    )
  except cluster.ClusterError as e:
    raise ConfigError(str(e)) from None


# -------------------------------------------------------------------------------------------------
# The loop.


def train(
  config: TrainConfig,
  workdir: str,
  *,
  step_callback: Optional[Callable[[int, Dict[str, float], DenseFlow], None]] = None,
) -> TrainResult:
  """Trains (or resumes) a DenseFlow in `workdir` under `config.strategy` (`cluster.py`).

  In a multi-worker run every worker calls this with the same config and the same (shared)
  `workdir`; only the chief writes there (docs/distributed.md).

  Args:
    config: the run's settings.
    workdir: run directory; an existing checkpoint there is resumed.
    step_callback: called after every loop of `config.steps_per_loop` steps (every step by
      default) as `callback(step, metrics, model)`, with the last step's `metrics` as Python
      numbers; raising `KeyboardInterrupt` there interrupts the run as Ctrl-C does.

  Returns:
    A `TrainResult`. Export (`config.export_dir`) is the caller's: `python -m
    tf_denseflow.train` exports `result.checkpoint`.

  Raises:
    ConfigError: the settings cannot work (checked before any training).
    TrainingError: too many non-finite steps in a row, or non-finite weights.
    WorkerLostError: (a `TrainingError`) a multi-worker run lost a worker.
    KeyboardInterrupt: after saving a checkpoint (when the weights are finite).
    data.DatasetNotFoundError: the dataset is not prepared.
  """
  started = time.time()  # the run's clock (`TrainResult.timing`)
  if not workdir:
    raise ConfigError('--workdir is required.')
  strategy = make_strategy(
    config.num_cpu_devices,
    config.strategy,
    cluster_wait_s=config.cluster_wait_s,
    collective_timeout_s=config.collective_timeout_s,
  )
  worker = cluster.worker_info(strategy)
  replicas = strategy.num_replicas_in_sync
  devices = strategy.extended.worker_devices
  global_batch = config.optim.global_batch_size
  for flag, batch in (('global', global_batch), ('eval', config.eval_batch_size or global_batch)):
    if batch % replicas:
      raise ConfigError(f'--{flag}_batch_size={batch} is not divisible by the {replicas} replicas.')
  resuming = _prepare_workdir(workdir, config, write=worker.is_chief)
  where = ', '.join(devices)
  if worker.num_workers > 1:
    role = 'chief' if worker.is_chief else 'not the chief'
    where = f'{worker.num_workers} workers; this one, {worker.name} ({role}): {where}'
  logging.info('Training on %d replica(s): %s', replicas, where)
  print(f'replicas: {replicas} ({where}); per-replica batch {global_batch // replicas}')
  try:  # both splits, before any step: every image file decodes, shapes and dtypes fit
    data_lib.check_data(config.data)
  except data_lib.BadDataError as e:
    raise ConfigError(str(e)) from None
  steps_per_epoch = config.optim.steps_per_epoch
  if steps_per_epoch is None:
    num_train = data_lib.num_examples(config.data, 'train') or global_batch
    steps_per_epoch = math.ceil(num_train / global_batch)

  kernels.set_conv_kernels(config.conv_kernels)  # read when the functions are traced
  grappler.set_grappler(config.grappler)  # read when they are first called
  trainer = Trainer(config, strategy, workdir, WarmupSchedule(config.optim, steps_per_epoch))
  start_step = trainer.restore_or_initialize(resuming)
  if resuming:
    path = trainer.latest_checkpoint
    logging.info('Resumed at step %d from %s', start_step, path)
    print(f'resumed at step {start_step} from {path}')
  logging.info('%d trainable parameters', trainer.model.num_parameters())
  result = TrainResult(
    step=start_step,
    start_step=start_step,
    num_replicas=replicas,
    is_chief=worker.is_chief,
    model=trainer.model,
    optimizer=trainer.optimizer,
    nonfinite_steps=int(trainer.nonfinite_steps.numpy()),
  )
  reporter = train_loop.Reporter(config, workdir, result, write=worker.is_chief, started=started)
  with _worker_faults(trainer):
    train_loop.run(trainer, reporter, step_callback)

    # End of run: the last checkpoint, then (unless stopped) the final evaluation and samples.
    current = int(trainer.step.numpy())
    result.step = current
    with reporter.timed('checkpoint'):
      result.checkpoint = trainer.save(current)
    if result.stopped_by:
      reporter.log_timing(current)
      return result
    if trainer.can_evaluate:
      with reporter.timed('eval'):
        result.test_bpd = trainer.evaluate()
      reporter.log_eval(current, result.test_bpd)
  if config.num_grid_samples and worker.is_chief:
    with reporter.timed('sample'):
      images = trainer.draw_samples()
      summaries.write_image_grid(reporter.writer, 'samples', images, current)
      result.samples = summaries.save_png(
        summaries.image_grid(images), workdir_lib.train_samples_path(workdir, current)
      )
  reporter.log_timing(current)
  reporter.writer.flush()
  return result


# What a collective raises on the workers that are left when a worker dies or hangs.
_LOST_WORKER_ERRORS = (
  tf.errors.UnavailableError,
  tf.errors.AbortedError,
  tf.errors.DeadlineExceededError,
  tf.errors.CancelledError,
  tf.errors.FailedPreconditionError,
  tf.errors.InternalError,
)


@contextlib.contextmanager
def _worker_faults(trainer: Trainer) -> Iterator[None]:
  """In a multi-worker run, turns a collective aborted by a lost worker into `WorkerLostError`."""
  worker = trainer.worker
  try:
    yield
  except _LOST_WORKER_ERRORS as e:
    if worker.num_workers == 1:
      raise
    cause = _lost_worker_cause(e)
    raise WorkerLostError(
      f'{worker.name} of {worker.num_workers} workers: the cluster lost a worker at step '
      f'{int(trainer.step.numpy())} ({cause}); the run stops. Restart every worker with the '
      f'same command: they resume from {trainer.latest_checkpoint}.'
    ) from None


def _lost_worker_cause(error: BaseException) -> str:
  """The part of a collective's error that names the lost worker, on one line."""
  text = ' '.join(str(error).split())
  for marker in ('The following tasks are unhealthy', 'Error reported from', 'failed to connect'):
    if marker in text:
      text = text[text.find(marker) :]
      break
  cut = text.find(' The tasks have crashed')
  return text[: cut if cut > 0 else 240][:240]


def _prepare_workdir(workdir: str, config: TrainConfig, write: bool = True) -> bool:
  """`workdir.prepare_train_workdir` with the errors of a bad `--workdir` as `ConfigError`."""
  previous = load_train_config(workdir)
  try:
    return workdir_lib.prepare_train_workdir(
      workdir, config.model, config.to_json(), previous, write=write
    )
  except workdir_lib.CheckpointError as e:
    raise ConfigError(str(e)) from None
  except (OSError, tf.errors.OpError) as e:
    raise ConfigError(
      f'--workdir={workdir}: cannot write there ({workdir_lib.one_line(e)}).'
    ) from None
