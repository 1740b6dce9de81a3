"""DenseFlow training loop on MirroredStrategy (settings: train_config.py, step: train_step.py).

`train(config, workdir)` runs the official recipe (Adamax, linear warm-up, then a constant or
exponentially decaying learning rate, then a constant fine-tune stage) on every visible GPU, or on
the CPU (optionally split into `num_cpu_devices` logical devices), and leaves in `workdir`:
```
WORKDIR/model_config.json      the architecture (checked on resume)
WORKDIR/train_config.json      every setting of the run (evaluate/sample read the dataset here)
WORKDIR/checkpoints/ckpt-N     tf.train.Checkpoint(model, optimizer, step, nonfinite_steps,
                                                   model_config)
WORKDIR/tb/                    TensorBoard scalars and sample grids
WORKDIR/metrics.jsonl          one JSON line per log/eval point (step, wall-clock, bits/dim)
WORKDIR/samples_stepN.png      the final sample grid
```

The step (DESIGN.md section 6; built by `train_step.make_train_step`):
```
nll   = -elbo(images, noise)                      # [per-replica batch], nats, training=True
loss  = compute_average_loss(nll, global_batch)   # SUM over replicas = global mean
grads = all_reduce(SUM, d loss / d weights)       # once; checked, measured, then applied
update if the step is safe (finite loss, gradients and BN statistics, an update that cannot
overflow), else skip it and count it (BN running statistics only assigned on update)
```

Randomness is stateless. The step's seed is `fold_in((seed, 1), step)`. With
`noise_seeding='global_batch'` (default) every replica draws the dequantization and augmentation
noise of the whole global batch from that seed and keeps the rows of its own examples, so example
`j` of the global batch gets the same noise whatever the number of replicas; with `'per_replica'`
the replica id is folded into the seed instead (cheaper: no redundant draws). The data stream is a
pure function of `(dataset, seed, global batch)`, and a resumed run restarts it at the exact batch
(`make_train_dataset(skip_batches=...)`), so an interrupted and resumed run computes the same
steps as an uninterrupted one.

Batch norm: in training mode the coupling networks normalise with the statistics of the
per-replica batch (no cross-replica sync, as PyTorch's DataParallel/DDP without SyncBatchNorm), so
with more than one replica the loss equals the mean of the per-replica losses, not the loss of the
global batch on one device; the two agree at initialisation (zero-initialised coupling outputs) and
in evaluation mode (running statistics).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_denseflow import data as data_lib
from tf_denseflow import summaries
from tf_denseflow import train_step as train_step_lib
from tf_denseflow import workdir as workdir_lib
from tf_denseflow.dequantization import UniformDequantization
from tf_denseflow.model import DenseFlow
from tf_denseflow.optim import Adamax
from tf_denseflow.train_config import (  # noqa: F401 -- re-exported: the public training API
  METRICS_FILE,
  TB_SUBDIR,
  TRAIN_CONFIG_FILE,
  ConfigError,
  OptimConfig,
  TrainConfig,
  TrainingError,
  WarmupSchedule,
  data_config_from_json,
  load_train_config,
  model_config_from_flags,
)

__all__ = [
  'ConfigError',
  'OptimConfig',
  'TRAIN_CONFIG_FILE',
  'METRICS_FILE',
  'TrainConfig',
  'TrainResult',
  'TrainingError',
  'WarmupSchedule',
  'configure_cpu_devices',
  'data_config_from_json',
  'load_train_config',
  'make_strategy',
  'model_config_from_flags',
  'nll_given_noise',
  'per_example_nll',
  'replica_noise',
  'step_seed',
  'train',
]

# Architecture fields that may change on resume: they do not change the function or the weights.
_RESUMABLE_MODEL_FIELDS = workdir_lib.WEIGHT_NEUTRAL_FIELDS
# Second words of the stateless seeds, one stream per use.
_TRAIN_STREAM, _EVAL_STREAM, _INIT_STREAM, _SAMPLE_STREAM = 1, 2, 3, 4


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


def make_strategy(num_cpu_devices: int = 0) -> tf.distribute.MirroredStrategy:
  """MirroredStrategy over `num_cpu_devices` logical CPUs, else all GPUs, else the CPU.

  Raises:
    ConfigError: fewer logical CPUs than requested.
  """
  if num_cpu_devices > 0:
    configure_cpu_devices(num_cpu_devices)
    cpus = tf.config.list_logical_devices('CPU')
    if len(cpus) < num_cpu_devices:
      raise ConfigError(
        f'--num_cpu_devices={num_cpu_devices} but only {len(cpus)} logical CPU(s) exist.'
      )
    return tf.distribute.MirroredStrategy([d.name for d in cpus[:num_cpu_devices]])
  gpus = tf.config.list_logical_devices('GPU')
  if gpus:
    return tf.distribute.MirroredStrategy([d.name for d in gpus])
  return tf.distribute.MirroredStrategy([tf.config.list_logical_devices('CPU')[0].name])


# -------------------------------------------------------------------------------------------------
# The per-example negative log-likelihood with replica-independent noise.


def step_seed(seed: int, step, stream: int = _TRAIN_STREAM) -> tf.Tensor:
  """The stateless seed of a training step: `fold_in((seed, stream), int64(step))`.

  The step is always folded in as int64 (`stateless_fold_in` draws in the dtype of the data, so
  int32 and int64 steps would give different seeds).
  """
  base = tf.constant([seed, stream], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))


def _global_batch_noise(model: DenseFlow, seed, global_batch: int, offset, size):
  """Rows `[offset, offset + size)` of the noise of a whole global batch drawn from `seed`."""
  seed_u, seed_noise = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  dequant_shape = [global_batch, *model.dequantizer.noise_shape]
  if isinstance(model.dequantizer, UniformDequantization):
    u = tf.random.stateless_uniform(dequant_shape, seed=seed_u)
  else:
    u = tf.random.stateless_normal(dequant_shape, seed=seed_u)
  shapes = model.config.noise_shapes()
  seeds = tf.random.experimental.stateless_split(seed_noise, max(1, len(shapes)))
  noise = [
    tf.random.stateless_normal([global_batch, *shape], seed=seeds[k])
    for k, shape in enumerate(shapes)
  ]
  return u[offset : offset + size], [n[offset : offset + size] for n in noise]


def replica_noise(
  model: DenseFlow,
  seed: tf.Tensor,
  replica_id,
  global_batch: int,
  size: int,
  noise_seeding: str = 'global_batch',
) -> Tuple[tf.Tensor, List[tf.Tensor]]:
  """The dequantization and augmentation noise of one replica's `size` examples.

  'global_batch': rows `replica_id * size ...` of the noise of the whole global batch drawn from
  `seed` (example j's noise does not depend on the replica count); 'per_replica': the draws of
  `model.elbo(images, fold_in(seed, replica_id))`.

  Drawn by TF's kernels outside any XLA cluster (XLA's stateless generators give other numbers
  for the same seed), so `--jit_compile` does not change the noise.
  """
  replica_id = tf.cast(replica_id, tf.int64)
  if noise_seeding == 'per_replica':
    return _global_batch_noise(
      model, tf.random.experimental.stateless_fold_in(seed, replica_id), size, 0, size
    )
  return _global_batch_noise(model, seed, global_batch, replica_id * size, size)


def nll_given_noise(model: DenseFlow, images, noise, training: bool) -> tf.Tensor:
  """`-elbo` in nats, `[B]`, with the noise `(u, [noise_1, ...])` of `replica_noise`."""
  u, augmentation = noise
  terms = model.log_likelihood_terms(images, training=training, dequant_noise=u, noise=augmentation)
  return -terms['total']


def per_example_nll(
  model: DenseFlow,
  images: tf.Tensor,
  seed: tf.Tensor,
  replica_id,
  global_batch: int,
  training: bool,
  noise_seeding: str = 'global_batch',
) -> tf.Tensor:
  """Single-sample negative ELBO in nats, `[B]`, of one replica's slice of a global batch.

  Args:
    model: the flow.
    images: uint8 `[B, H, W, C]`, rows `replica_id * B ...` of the global batch.
    seed: the step's stateless seed `[2]` (int64).
    replica_id: the replica's index (int or scalar tensor).
    global_batch: examples in the global batch (`B * replicas`).
    training: batch-norm mode.
    noise_seeding: 'global_batch' (noise of global row j is the same for any replica count) or
      'per_replica' (`model.elbo` with the replica id folded into the seed).

  Returns:
    `-elbo`, `[B]`.
  """
  size = images.shape[0]
  if size is None:
    raise ValueError('per_example_nll needs a static batch size.')
  noise = replica_noise(model, seed, replica_id, global_batch, size, noise_seeding)
  return nll_given_noise(model, images, noise, training)


# -------------------------------------------------------------------------------------------------
# Results and the run directory.


@dataclasses.dataclass
class TrainResult:
  """What a run did.

  Attributes:
    step: the global step at the end.
    start_step: the step the run started (or resumed) at.
    test_bpd: the final test-split ELBO bits/dim (None without evaluation).
    checkpoint: the last checkpoint path.
    samples: the final sample grid PNG (None without samples).
    export: the exported SavedModel version directory (None without export).
    nonfinite_steps: skipped steps over the whole run (checkpointed).
    stopped_by: None when the schedule finished, else 'SIGTERM' or 'KeyboardInterrupt'.
    losses: `(step, loss in nats)` of every step of this run.
    evals: `(step, seconds since start, test bits/dim)` of every evaluation of this run.
    num_replicas: replicas in sync.
    model: the trained model (its variables are mirrored under the run's strategy).
    optimizer: the optimizer (its `iterations` counts the applied updates).
  """

  step: int
  start_step: int
  test_bpd: Optional[float] = None
  checkpoint: Optional[str] = None
  samples: Optional[str] = None
  export: Optional[str] = None
  nonfinite_steps: int = 0
  stopped_by: Optional[str] = None
  losses: List[Tuple[int, float]] = dataclasses.field(default_factory=list)
  evals: List[Tuple[int, float, float]] = dataclasses.field(default_factory=list)
  num_replicas: int = 1
  model: Optional[DenseFlow] = None
  optimizer: Optional[keras.optimizers.Optimizer] = None


def _prepare_workdir(workdir: str, config: TrainConfig) -> bool:
  """Checks the workdir's architecture against `config`, writes the configs; True if resuming.

  Raises:
    ConfigError: the workdir holds a different architecture.
  """
  try:
    resuming = workdir_lib.latest_checkpoint(workdir) is not None
    config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    saved = None
    if tf.io.gfile.exists(config_path):
      saved = dataclasses.asdict(workdir_lib.load_model_config(workdir))
  except (workdir_lib.CheckpointError, OSError) as e:
    raise ConfigError(str(e)) from None
  if saved is not None:
    current = dataclasses.asdict(config.model)
    changed = [
      f'{k}: {_plain(saved[k])} in the workdir, {_plain(current[k])} now'
      for k in current
      if _plain(saved.get(k)) != _plain(current[k]) and k not in _RESUMABLE_MODEL_FIELDS
    ]
    if changed and resuming:
      raise ConfigError(
        f'--workdir={workdir} holds a model with another architecture ('
        + '; '.join(changed)
        + '); use the flags of that run or a new --workdir.'
      )
  previous = load_train_config(workdir)
  if resuming and previous:
    now = config.to_json()
    for key in ('seed', 'noise_seeding'):
      if previous.get(key) != now.get(key):
        logging.warning('Resuming with %s=%s (was %s).', key, now.get(key), previous.get(key))
    for key in ('global_batch_size', 'train_steps', 'learning_rate'):
      if previous.get('optim', {}).get(key) != now['optim'].get(key):
        logging.warning(
          'Resuming with %s=%s (was %s).', key, now['optim'][key], previous['optim'].get(key)
        )
    if previous.get('data') != now['data']:
      logging.warning(
        'Resuming with other data settings: %s (was %s).', now['data'], previous['data']
      )
  workdir_lib.save_model_config(workdir, config.model)
  path = os.path.join(workdir, TRAIN_CONFIG_FILE)
  with tf.io.gfile.GFile(path + '.tmp', 'w') as f:
    json.dump(config.to_json(), f, indent=2, sort_keys=True)
  tf.io.gfile.rename(path + '.tmp', path, overwrite=True)
  return resuming


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def _plain(value):
  """JSON-comparable form (tuples and lists compare equal)."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _resume(path: str, state: Dict, model_config, workdir: str) -> None:
  """Restores the whole training state from `path`, or raises `ConfigError` saying why not.

  Everything must match (`workdir.restore_checkpoint`): the model config the checkpoint was
  written for, every model and optimizer variable (resuming without the Adamax slots would
  silently restart the moments), the step and the skipped-step counter. The restored values must
  be finite (the update bound of `optim.Adamax` assumes finite slots).
  """
  try:
    workdir_lib.restore_checkpoint(
      path,
      state,
      model_config,
      config_source=f'the model config of this run ({workdir}/{workdir_lib.CONFIG_FILE})',
      exclusive=('model', 'optimizer'),
    )
  except workdir_lib.CheckpointError as e:
    raise ConfigError(f'Cannot resume: {e}') from None
  variables = state['model'].trainable_variables + state['model'].non_trainable_keras_variables
  bad = workdir_lib.nonfinite_variables(variables + list(state['optimizer'].variables))
  if bad:
    raise ConfigError(f'Cannot resume from {path}: non-finite values in {", ".join(bad[:3])}.')


class _StopSignal:
  """Turns SIGTERM into a flag the loop checks between steps (main thread only)."""

  def __init__(self):
    self.received = None
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


# -------------------------------------------------------------------------------------------------
# The loop.


def train(
  config: TrainConfig,
  workdir: str,
  *,
  step_callback: Optional[Callable[[int, Dict[str, float], DenseFlow], None]] = None,
  nonfinite_at: Sequence[int] = (),
) -> TrainResult:
  """Trains (or resumes) a DenseFlow in `workdir` with MirroredStrategy.

  Args:
    config: the run's settings.
    workdir: run directory; an existing checkpoint there is resumed.
    step_callback: called after every step as `callback(step, metrics, model)` (at the loop
      boundary; `metrics` holds Python numbers); raising `KeyboardInterrupt` there interrupts the
      run as Ctrl-C does.
    nonfinite_at: test hook: the loss of these global steps is multiplied by NaN.

  Returns:
    A `TrainResult`.

  Raises:
    ConfigError: the settings cannot work (checked before any training).
    TrainingError: too many non-finite steps in a row, or non-finite weights.
    KeyboardInterrupt: after saving a checkpoint (when the weights are finite).
    data.DatasetNotFoundError: the dataset is not prepared.
  """
  # ----------------------------------------------------------------- Devices and workdir
  if not workdir:
    raise ConfigError('--workdir is required.')
  strategy = make_strategy(config.num_cpu_devices)
  replicas = strategy.num_replicas_in_sync
  devices = strategy.extended.worker_devices
  global_batch = config.optim.global_batch_size
  eval_batch = config.eval_batch_size or global_batch
  if global_batch % replicas:
    raise ConfigError(
      f'--global_batch_size={global_batch} is not divisible by the {replicas} replicas.'
    )
  if eval_batch % replicas:
    raise ConfigError(
      f'--eval_batch_size={eval_batch} is not divisible by the {replicas} replicas.'
    )
  per_replica_batch = global_batch // replicas
  try:
    resuming = _prepare_workdir(workdir, config)
  except (OSError, tf.errors.OpError) as e:
    raise ConfigError(f'--workdir={workdir}: cannot write there ({_first_line(e)}).') from None
  logging.info('Training on %d replica(s): %s', replicas, ', '.join(devices))
  print(f'replicas: {replicas} ({", ".join(devices)}); per-replica batch {per_replica_batch}')

  # ----------------------------------------------------------------- Data
  try:  # both splits, before any step: every image file decodes, shapes and dtypes fit
    data_lib.check_data(config.data)
  except data_lib.BadDataError as e:
    raise ConfigError(str(e)) from None
  steps_per_epoch = config.optim.steps_per_epoch
  if steps_per_epoch is None:
    num_train = data_lib.num_examples(config.data, 'train') or global_batch
    steps_per_epoch = math.ceil(num_train / global_batch)
  schedule = WarmupSchedule(config.optim, steps_per_epoch)
  scale = config.model.bits_per_dim_scale
  total_steps = config.optim.total_steps

  # ----------------------------------------------------------------- Model and optimizer
  with strategy.scope():
    model = DenseFlow(config.model, seed=config.seed)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
    nonfinite_total = tf.Variable(0, dtype=tf.int64, trainable=False, name='nonfinite_steps')
    optimizer = Adamax(learning_rate=lambda: schedule(step), epsilon=config.optim.adamax_epsilon)
    trainable = model.trainable_variables
    optimizer.build(trainable)
  state = dict(model=model, optimizer=optimizer, step=step, nonfinite_steps=nonfinite_total)
  checkpoint = tf.train.Checkpoint(
    **state, model_config=workdir_lib.model_config_variable(config.model)
  )
  manager = tf.train.CheckpointManager(
    checkpoint, workdir_lib.checkpoint_dir(workdir), max_to_keep=config.keep_checkpoints
  )

  # ----------------------------------------------------------------- Restore or initialise
  if resuming:
    _resume(manager.latest_checkpoint, state, config.model, workdir)
    logging.info('Resumed at step %d from %s', int(step.numpy()), manager.latest_checkpoint)
    print(f'resumed at step {int(step.numpy())} from {manager.latest_checkpoint}')
  else:
    # ActNorm's data-dependent init, once, in cross-replica context, on the first global batch.
    first = next(iter(data_lib.make_train_dataset(config.data, global_batch, seed=config.seed)))
    with strategy.scope():
      model.initialize(first, seed=(config.seed, _INIT_STREAM))
  start_step = int(step.numpy())
  logging.info('%d trainable parameters', model.num_parameters())

  # ----------------------------------------------------------------- Input pipeline
  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    batches_per_step = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    return data_lib.make_train_dataset(
      config.data,
      ctx.get_per_replica_batch_size(global_batch),
      input_context=ctx,
      seed=config.seed,
      skip_batches=start_step * batches_per_step,
    )

  iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))

  # ----------------------------------------------------------------- Update step
  train_step = train_step_lib.make_train_step(
    strategy,
    model,
    optimizer,
    trainable,
    lambda images, seed, replica_id: replica_noise(
      model, seed, replica_id, global_batch, images.shape[0], config.noise_seeding
    ),
    lambda images, noise: nll_given_noise(model, images, noise, training=True),
    global_batch,
    step,
    nonfinite_total,
    seed_fn=lambda s: step_seed(config.seed, s),
    learning_rate_fn=schedule,
    jit_compile=config.jit_compile,
  )

  # ----------------------------------------------------------------- Evaluation and samples
  eval_dataset = None
  if config.eval_examples != 0:
    eval_dataset = _distributed_eval_dataset(config, strategy, eval_batch)

  def replica_eval(images, weights, seed):
    ctx = tf.distribute.get_replica_context()
    nll = per_example_nll(
      model, images, seed, ctx.replica_id_in_sync_group, eval_batch, False, config.noise_seeding
    )
    return tf.reduce_sum(nll * weights), tf.reduce_sum(weights)

  @tf.function(autograph=False)
  def eval_step(batch, index):
    seed = step_seed(config.seed, index, _EVAL_STREAM)
    total, count = strategy.run(replica_eval, args=(batch[0], batch[1], seed))
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, total, axis=None)
    return total, strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None)

  def evaluate() -> float:
    total, count = 0.0, 0.0
    for index, batch in enumerate(eval_dataset):
      t, c = eval_step(batch, tf.constant(index, tf.int64))
      total += float(t)
      count += float(c)
    return total / max(count, 1.0) * scale

  sample_fn = tf.function(
    lambda seed: model.sample(config.num_grid_samples, seed, config.sample_temperature),
    autograph=False,
  )

  def draw_samples() -> np.ndarray:
    seed = tf.constant([config.seed, _SAMPLE_STREAM], tf.int64)
    with strategy.scope():
      return sample_fn(seed).numpy()

  # ----------------------------------------------------------------- Train loop
  writer = tf.summary.create_file_writer(os.path.join(workdir, TB_SUBDIR))
  metrics_path = os.path.join(workdir, METRICS_FILE)
  result = TrainResult(
    step=start_step,
    start_step=start_step,
    num_replicas=replicas,
    model=model,
    optimizer=optimizer,
  )
  result.nonfinite_steps = int(nonfinite_total.numpy())
  saved_step = start_step if resuming else -1
  run_start = time.time()
  progress = None  # created after the first step, so that tracing does not skew the ETA
  consecutive_nonfinite = 0
  skip_reasons: Dict[str, int] = {}  # causes of the current run of skipped steps
  window = {'loss': 0.0, 'count': 0, 'start': time.time(), 'steps': 0}
  nonfinite_at = frozenset(int(s) for s in nonfinite_at)

  def save(current: int) -> Optional[str]:
    nonlocal saved_step
    if current == saved_step:
      return manager.latest_checkpoint
    variables = list(trainable) + list(model.non_trainable_keras_variables)
    bad = workdir_lib.nonfinite_variables(variables)
    if bad:
      raise TrainingError(
        f'Non-finite weights at step {current} ({", ".join(bad[:3])}'
        f'{f" and {len(bad) - 3} more" if len(bad) > 3 else ""}): not saving them. The last '
        f'good checkpoint is {manager.latest_checkpoint}.'
      )
    path = manager.save(checkpoint_number=current)
    saved_step = current
    return path

  def log_metrics(record: Dict) -> None:
    with tf.io.gfile.GFile(metrics_path, 'a') as f:
      f.write(json.dumps(record) + '\n')

  def run_eval(current: int) -> float:
    bpd = evaluate()
    elapsed = time.time() - run_start
    result.evals.append((current, elapsed, bpd))
    summaries.write_scalars(writer, {'eval/bits_per_dim': bpd}, current)
    log_metrics({'step': current, 'elapsed_s': round(elapsed, 3), 'eval_bpd': bpd})
    logging.info('step %d: test ELBO %.4f bits/dim', current, bpd)
    if progress is not None:
      progress.write(f'step {current}: test bits/dim {bpd:.4f}')
    return bpd

  current = start_step
  with _StopSignal() as stop:
    try:
      while current < total_steps:
        multiplier = float('nan') if current in nonfinite_at else 1.0
        out = train_step(iterator, tf.constant(multiplier, tf.float32))
        out = {k: v.numpy() for k, v in out.items()}
        current += 1
        loss = float(out['loss'])
        result.losses.append((current - 1, loss))
        if not out['finite']:
          consecutive_nonfinite += 1
          reason = train_step_lib.SKIP_REASONS[int(out['skip_reason'])]
          skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
          result.nonfinite_steps = int(nonfinite_total.numpy())
          logging.warning(
            'step %d: %s (loss %s, learning rate %s); update skipped (%d in a row, %d in total).',
            current - 1,
            reason,
            loss,
            float(out['learning_rate']),
            consecutive_nonfinite,
            result.nonfinite_steps,
          )
          if consecutive_nonfinite >= config.optim.max_consecutive_nonfinite:
            causes = ', '.join(f'{n} x {r}' for r, n in skip_reasons.items())
            raise TrainingError(
              f'{consecutive_nonfinite} consecutive steps skipped (steps '
              f'{current - consecutive_nonfinite}-{current - 1}: {causes}; learning rate '
              f'{float(out["learning_rate"]):g}); stopping. The last checkpoint '
              f'({manager.latest_checkpoint}) holds finite weights; lower --learning_rate or '
              'raise --warmup_steps before resuming.'
            )
        else:
          consecutive_nonfinite = 0
          skip_reasons = {}
          window['loss'] += loss
          window['count'] += 1
        window['steps'] += 1
        metrics = {
          'loss': loss,
          'bits_per_dim': loss * scale,
          'grad_norm': float(out['grad_norm']),
          'learning_rate': float(out['learning_rate']),
          'finite': bool(out['finite']),
        }
        if progress is None:
          progress = _progress_bar(config, current, total_steps)
        else:
          progress.update(1)
        if current % config.log_every == 0 or current == total_steps:
          elapsed = max(time.time() - window['start'], 1e-9)
          images_per_s = window['steps'] * global_batch / elapsed
          train_bpd = window['loss'] / window['count'] * scale if window['count'] else math.nan
          summaries.write_scalars(
            writer,
            {
              'train/bits_per_dim': train_bpd,
              'train/learning_rate': metrics['learning_rate'],
              'train/grad_norm': metrics['grad_norm'],
              'train/images_per_s': images_per_s,
              'train/skipped_steps': result.nonfinite_steps,
            },
            current,
          )
          log_metrics(
            {
              'step': current,
              'elapsed_s': round(time.time() - run_start, 3),
              'train_bpd': train_bpd,
              'learning_rate': metrics['learning_rate'],
              'grad_norm': metrics['grad_norm'],
              'images_per_s': images_per_s,
              'skipped_steps': result.nonfinite_steps,
            }
          )
          if progress is not None:
            progress.set_postfix(bpd=f'{train_bpd:.3f}', img_s=f'{images_per_s:.1f}')
          window = {'loss': 0.0, 'count': 0, 'start': time.time(), 'steps': 0}
        if current % config.checkpoint_every == 0:
          save(current)
        if eval_dataset is not None and config.eval_every and current % config.eval_every == 0:
          if current < total_steps:
            run_eval(current)
        if config.num_grid_samples and config.sample_every and current % config.sample_every == 0:
          if current < total_steps:
            summaries.write_image_grid(writer, 'samples', draw_samples(), current)
        if step_callback is not None:
          step_callback(current, metrics, model)
        if stop.received:
          result.stopped_by = stop.received
          logging.warning('%s received: stopping at step %d.', stop.received, current)
          break
    except KeyboardInterrupt:
      result.stopped_by = 'KeyboardInterrupt'
      if progress is not None:
        progress.close()
      path = save(int(step.numpy()))
      print(f'interrupted at step {int(step.numpy())}; checkpoint: {path}', file=sys.stderr)
      raise
    finally:
      if progress is not None:
        progress.close()

  # ----------------------------------------------------------------- End of run
  current = int(step.numpy())
  result.step = current
  result.checkpoint = save(current)
  if result.stopped_by:
    return result
  if eval_dataset is not None:
    result.test_bpd = run_eval(current)
  if config.num_grid_samples:
    images = draw_samples()
    summaries.write_image_grid(writer, 'samples', images, current)
    result.samples = summaries.save_png(
      summaries.image_grid(images), os.path.join(workdir, f'samples_step{current}.png')
    )
  writer.flush()
  if config.export_dir:
    result.export = _export(workdir, config.export_dir)
  return result


def _progress_bar(config: TrainConfig, start: int, total: int):
  if not config.progress_bar:
    return None
  from tqdm import tqdm

  return tqdm(total=total, initial=start, unit='step', dynamic_ncols=True, smoothing=0.05)


def _distributed_eval_dataset(
  config: TrainConfig, strategy: tf.distribute.Strategy, eval_batch: int
) -> tf.distribute.DistributedDataset:
  """The test split as `(images, weights)`, padded with weight-0 images to whole global batches.

  Each replica gets consecutive per-replica batches, so global batch k holds examples
  `k * eval_batch ...`: replica r's rows are `r * eval_batch / replicas ...` of it, as in training.
  """
  count = data_lib.num_examples(config.data, 'test')
  if config.eval_examples is not None:
    count = config.eval_examples if count is None else min(count, config.eval_examples)
  if not count:
    raise ConfigError(f'The test split of {config.data.dataset!r} is empty.')
  padded = math.ceil(count / eval_batch) * eval_batch
  image_shape = tuple(config.model.image_shape)

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    examples = data_lib.load_split(config.data, 'test').take(count)
    examples = examples.map(lambda x: (x, tf.constant(1.0)))
    padding = tf.data.Dataset.from_tensors(
      (tf.zeros(image_shape, tf.uint8), tf.constant(0.0))
    ).repeat(padded - count)
    ds = examples.concatenate(padding).cache()
    ds = ds.batch(ctx.get_per_replica_batch_size(eval_batch), drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)

  return strategy.distribute_datasets_from_function(dataset_fn)


def _export(workdir: str, export_dir: str) -> str:
  """Exports the workdir's latest checkpoint (restored outside the strategy) as a SavedModel."""
  try:
    from tf_denseflow import export as export_lib
  except ImportError as e:
    raise TrainingError(
      f'--export_dir is set but tf_denseflow.export cannot be imported ({e}); the checkpoint is '
      'saved, export it later with python -m tf_denseflow.export.'
    ) from e
  model, step = workdir_lib.restore_model(workdir)
  return export_lib.export_saved_model(model, export_dir, step=step)
