"""Training settings: `TrainConfig` (from flags or JSON), `OptimConfig` and the learning-rate schedule.

`train_lib.train` runs a `TrainConfig`; `train_config.json` in the run directory records it (the
evaluate and sample CLIs read the dataset settings back with `load_train_config` and
`data_config_from_json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional, Sequence

import keras
import tensorflow as tf

from tf_denseflow import checks
from tf_denseflow import data as data_lib
from tf_denseflow import flags as flags_lib
from tf_denseflow.config import DenseFlowConfig

__all__ = [
  'ConfigError',
  'METRICS_FILE',
  'OptimConfig',
  'TB_SUBDIR',
  'TRAIN_CONFIG_FILE',
  'TrainConfig',
  'TrainingError',
  'WarmupSchedule',
  'data_config_from_json',
  'load_train_config',
  'model_config_from_flags',
]

TRAIN_CONFIG_FILE = 'train_config.json'
METRICS_FILE = 'metrics.jsonl'
TB_SUBDIR = 'tb'


class ConfigError(ValueError):
  """A setting cannot work (bad flag combination, wrong workdir); the message says which."""


class TrainingError(RuntimeError):
  """Training cannot continue (too many non-finite steps, non-finite weights)."""


# -------------------------------------------------------------------------------------------------
# Configs.


def _check_int(flag: str, value, minimum: int, maximum: int) -> None:
  try:
    checks.check_int(f'--{flag}', value, minimum, maximum)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None


def _check_float(flag: str, value, minimum: float, exclusive_minimum=False, maximum=None) -> None:
  try:
    checks.check_float(
      f'--{flag}', value, minimum, exclusive_minimum, maximum or flags_lib.FLOAT32_MAX
    )
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimisation recipe (defaults: the official CIFAR-10 command).

  Attributes:
    global_batch_size: images per step over all replicas.
    learning_rate: Adamax learning rate after warm-up.
    adamax_epsilon: Adamax epsilon.
    warmup_steps: linear warm-up steps.
    lr_schedule: 'constant' or 'exponential' after warm-up (see `WarmupSchedule`).
    lr_decay_gamma: decay per epoch of the exponential schedule.
    steps_per_epoch: epoch length for the decay; None = ceil(train examples / global batch).
    train_steps: steps of the main stage.
    finetune_lr: constant learning rate of the fine-tune stage.
    finetune_steps: steps of the fine-tune stage (after `train_steps`).
    max_consecutive_nonfinite: stop after this many skipped (non-finite) steps in a row.
  """

  global_batch_size: int = 64
  learning_rate: float = 1e-3
  adamax_epsilon: float = 1e-8
  warmup_steps: int = 5000
  lr_schedule: str = 'constant'
  lr_decay_gamma: float = 0.9975
  steps_per_epoch: Optional[int] = None
  train_steps: int = 312_800
  finetune_lr: float = 2e-5
  finetune_steps: int = 15_640
  max_consecutive_nonfinite: int = 10

  def __post_init__(self):
    if self.lr_schedule not in flags_lib.LR_SCHEDULES:
      raise ConfigError(
        f'--lr_schedule must be one of {flags_lib.LR_SCHEDULES}, got {self.lr_schedule!r}.'
      )
    _check_int('global_batch_size', self.global_batch_size, 1, flags_lib.INT32_MAX)
    # Learning rates and epsilon meet the weights in float32 (the fused Adamax kernel): they
    # must be finite there, and epsilon a normal float32 (0 gives 0/0 on a zero gradient entry).
    _check_float('learning_rate', self.learning_rate, 0.0, exclusive_minimum=True)
    _check_float('finetune_lr', self.finetune_lr, 0.0, exclusive_minimum=True)
    _check_float('adamax_epsilon', self.adamax_epsilon, flags_lib.FLOAT32_TINY)
    _check_float('lr_decay_gamma', self.lr_decay_gamma, 0.0, exclusive_minimum=True, maximum=1.0)
    for name in ('warmup_steps', 'train_steps', 'finetune_steps'):
      _check_int(name, getattr(self, name), 0, flags_lib.MAX_STEPS)
    if self.steps_per_epoch is not None:
      _check_int('steps_per_epoch', self.steps_per_epoch, 1, flags_lib.MAX_STEPS)
    _check_int('max_consecutive_nonfinite', self.max_consecutive_nonfinite, 1, flags_lib.INT32_MAX)

  @property
  def total_steps(self) -> int:
    """Main stage plus fine-tune stage."""
    return self.train_steps + self.finetune_steps


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run needs; built from flags by `from_flags`, or directly in tests.

  Attributes:
    model: the architecture (its `image_shape` must match the data).
    data: what to train and evaluate on.
    optim: the optimisation recipe.
    seed: seed of the weights, the data order and every noise draw.
    noise_seeding: 'global_batch' (replica-count invariant) or 'per_replica'.
    jit_compile: XLA-compile the per-replica loss-and-gradient function.
    steps_per_loop: training steps per `tf.function` call (orbit's inner loop): one host sync
      per `steps_per_loop` steps, so an accelerator is not idled by the host every step.
      Logging, evaluation, checkpoint and sample intervals are rounded to whole loops.
    num_cpu_devices: train on this many logical CPU devices (0: all GPUs, else one CPU).
    checkpoint_every: steps between checkpoints.
    keep_checkpoints: checkpoints to keep.
    eval_every: steps between test-split evaluations (0: only at the end).
    eval_examples: test examples per evaluation (None: all; 0: no evaluation).
    eval_batch_size: global evaluation batch (None: `optim.global_batch_size`).
    log_every: steps between scalar summaries.
    sample_every: steps between TensorBoard sample grids (0: only at the end).
    num_grid_samples: samples per grid (0: none).
    sample_temperature: temperature of the grids.
    export_dir: if set, export a SavedModel there after training.
    progress_bar: show a tqdm progress bar.
  """

  model: DenseFlowConfig = dataclasses.field(default_factory=DenseFlowConfig)
  data: data_lib.DataConfig = dataclasses.field(default_factory=data_lib.DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  seed: int = 0
  noise_seeding: str = 'global_batch'
  jit_compile: bool = False
  steps_per_loop: int = 1
  num_cpu_devices: int = 0
  checkpoint_every: int = 2000
  keep_checkpoints: int = 3
  eval_every: int = 7820
  eval_examples: Optional[int] = None
  eval_batch_size: Optional[int] = None
  log_every: int = 100
  sample_every: int = 7820
  num_grid_samples: int = 64
  sample_temperature: float = 1.0
  export_dir: Optional[str] = None
  progress_bar: bool = True

  def __post_init__(self):
    if self.noise_seeding not in flags_lib.NOISE_SEEDINGS:
      raise ConfigError(
        f'--noise_seeding must be one of {flags_lib.NOISE_SEEDINGS}, got {self.noise_seeding!r}.'
      )
    _check_int('seed', self.seed, flags_lib.INT64_MIN, flags_lib.INT64_MAX)
    for name in ('checkpoint_every', 'log_every'):
      _check_int(name, getattr(self, name), 1, flags_lib.MAX_STEPS)
    for name in ('eval_every', 'sample_every'):
      _check_int(name, getattr(self, name), 0, flags_lib.MAX_STEPS)
    _check_int('keep_checkpoints', self.keep_checkpoints, 1, flags_lib.INT32_MAX)
    _check_int('steps_per_loop', self.steps_per_loop, 1, flags_lib.MAX_STEPS)
    _check_int('num_grid_samples', self.num_grid_samples, 0, flags_lib.INT32_MAX)
    _check_int('num_cpu_devices', self.num_cpu_devices, 0, flags_lib.MAX_CPU_DEVICES)
    if self.eval_batch_size is not None:
      _check_int('eval_batch_size', self.eval_batch_size, 1, flags_lib.INT32_MAX)
    if self.eval_examples is not None:
      _check_int('eval_examples', self.eval_examples, 0, flags_lib.INT64_MAX)
    _check_float('sample_temperature', self.sample_temperature, 0.0)
    expected = data_lib.image_shape(self.data)
    if tuple(self.model.image_shape) != tuple(expected):
      raise ConfigError(
        f'The model image_shape {tuple(self.model.image_shape)} does not match the data '
        f'{tuple(expected)} (dataset {self.data.dataset!r}).'
      )

  @classmethod
  def from_flags(cls, flag_values) -> TrainConfig:
    """Builds the config from parsed `flags.define_flags()` flags.

    The architecture is `--model_preset` with the model flags given explicitly on top of it
    (`custom`: every model flag as it stands); the image shape comes from the dataset and
    `--image_size`.

    Args:
      flag_values: parsed `absl.flags.FlagValues` holding the flags of `define_flags()`.

    Returns:
      The frozen config.

    Raises:
      ConfigError: a bad value or combination (unknown dataset, image size the architecture
        cannot take, ...); the message names the flag.
    """
    fv = flag_values
    try:
      data = data_lib.DataConfig(
        dataset=fv.dataset,
        data_dir=fv.data_dir,
        image_dir=fv.image_dir,
        image_size=fv.image_size,
        download=fv.download,
        skip_bad_images=fv.skip_bad_images,
        augmentation=fv.augmentation,
        shuffle_buffer=fv.shuffle_buffer,
        celeba_center_crop=fv.celeba_center_crop,
        embedded_num_train=fv.embedded_num_train,
        embedded_num_test=fv.embedded_num_test,
        seed=0,
      )
      image_shape = data_lib.image_shape(data)
    except (ValueError, data_lib.DatasetNotFoundError) as e:
      raise ConfigError(str(e)) from None
    model = model_config_from_flags(fv, image_shape)
    export_dir = fv.export_dir
    if fv.export and not export_dir:
      export_dir = os.path.join(fv.workdir, 'export') if fv.workdir else None
    optim = OptimConfig(
      global_batch_size=fv.global_batch_size,
      learning_rate=fv.learning_rate,
      adamax_epsilon=fv.adamax_epsilon,
      warmup_steps=fv.warmup_steps,
      lr_schedule=fv.lr_schedule,
      lr_decay_gamma=fv.lr_decay_gamma,
      steps_per_epoch=fv.steps_per_epoch,
      train_steps=fv.train_steps,
      finetune_lr=fv.finetune_lr,
      finetune_steps=fv.finetune_steps,
      max_consecutive_nonfinite=fv.max_consecutive_nonfinite,
    )
    return cls(
      model=model,
      data=data,
      optim=optim,
      seed=fv.seed,
      noise_seeding=fv.noise_seeding,
      jit_compile=fv.jit_compile,
      steps_per_loop=fv.steps_per_loop,
      num_cpu_devices=fv.num_cpu_devices,
      checkpoint_every=fv.checkpoint_every,
      keep_checkpoints=fv.keep_checkpoints,
      eval_every=fv.eval_every,
      eval_examples=fv.eval_examples,
      eval_batch_size=fv.eval_batch_size,
      log_every=fv.log_every,
      sample_every=fv.sample_every,
      num_grid_samples=fv.num_grid_samples,
      sample_temperature=fv.sample_temperature,
      export_dir=export_dir,
      progress_bar=fv.progress_bar,
    )

  def to_json(self) -> Dict:
    """A JSON-ready dict of every setting."""
    return dataclasses.asdict(self)


def model_config_from_flags(flag_values, image_shape: Sequence[int]) -> DenseFlowConfig:
  """`--model_preset` plus the explicitly given model flags, as a `DenseFlowConfig`.

  Raises:
    ConfigError: the combination is not a valid architecture (the message names the field).
  """
  fv = flag_values
  values = {}
  for flag_name, field in flags_lib.MODEL_FLAGS.items():
    if fv.model_preset == 'custom' or flags_lib.explicitly_set(fv, flag_name):
      value = fv[flag_name].value
      if flag_name in ('units_per_block', 'steps_per_unit', 'coupling_channels'):
        try:
          value = tuple(int(v) for v in value)
        except ValueError:
          raise ConfigError(f'--{flag_name} must be a comma-separated list of ints.') from None
      values[field] = value
  try:
    if fv.model_preset == 'custom':
      return DenseFlowConfig(image_shape=tuple(image_shape), **values)
    return getattr(DenseFlowConfig, fv.model_preset)(tuple(image_shape), **values)
  except ValueError as e:
    raise ConfigError(f'Invalid architecture: {e}') from None


def load_train_config(workdir: str) -> Dict:
  """The `train_config.json` of a run directory, as a dict (empty if there is none).

  Raises:
    ConfigError: the file is unreadable or not a JSON object (the message names it).
  """
  path = os.path.join(workdir, TRAIN_CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    return {}
  try:
    with tf.io.gfile.GFile(path) as f:
      fields = json.load(f)
  except (ValueError, OSError, tf.errors.OpError) as e:  # JSONDecodeError, UnicodeDecodeError
    raise ConfigError(f'{path}: not a readable JSON train config ({e}).') from None
  if not isinstance(fields, dict) or not all(
    isinstance(fields.get(k, {}), dict) for k in ('data', 'optim', 'model')
  ):
    raise ConfigError(
      f'{path}: not a train config (a JSON object of `data`, `optim`, ... objects).'
    )
  return fields


def data_config_from_json(fields: Dict, source: str = TRAIN_CONFIG_FILE) -> data_lib.DataConfig:
  """Rebuilds a `DataConfig` from the `data` section of `train_config.json`.

  Raises:
    ConfigError: the fields do not make a valid data config (the message names `source`).
  """
  names = {f.name for f in dataclasses.fields(data_lib.DataConfig)}
  try:
    return data_lib.DataConfig(**{k: v for k, v in fields.items() if k in names})
  except (TypeError, ValueError) as e:
    raise ConfigError(f'{source}: invalid data settings: {e}') from None


# -------------------------------------------------------------------------------------------------
# Learning-rate schedule.


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up, then constant or exponential decay, then a constant fine-tune stage.

  ```
  t < train_steps:   lr(t) = learning_rate * min(1, (t + 1) / warmup_steps) * decay(t)
                     decay(t) = 1 (constant) or lr_decay_gamma ** floor(t / steps_per_epoch)
  t >= train_steps:  lr(t) = finetune_lr
  ```
  `t` is the 0-based global step. The warm-up uses `(t + 1)`, so the first step already moves
  the weights; the official `LinearWarmupScheduler` gives `t / warmup` (its first step runs at
  lr 0). 'constant' is what the official commands effectively run (their warm-up scheduler
  resets the exponential decay every step, denseflow_spec.md section 4.2); 'exponential' is the
  paper's description, with the decay counted from step 0 as `ExponentialLR` per epoch does.
  """

  def __init__(self, config: OptimConfig, steps_per_epoch: int = 1):
    super().__init__()
    self.config = config
    self.steps_per_epoch = max(1, int(steps_per_epoch))

  def __call__(self, step):
    c = self.config
    t = tf.cast(step, tf.float32)
    warmup = tf.minimum(1.0, (t + 1.0) / float(max(1, c.warmup_steps)))
    lr = c.learning_rate * warmup
    if c.lr_schedule == 'exponential':
      epoch = tf.floor(t / float(self.steps_per_epoch))
      lr = lr * tf.pow(tf.constant(c.lr_decay_gamma, tf.float32), epoch)
    return tf.where(t < float(c.train_steps), lr, tf.constant(c.finetune_lr, tf.float32))

  def get_config(self) -> Dict:
    return {'config': dataclasses.asdict(self.config), 'steps_per_epoch': self.steps_per_epoch}
