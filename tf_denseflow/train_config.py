"""Training settings: `TrainConfig` (from flags or JSON), `OptimConfig` and the learning-rate schedule.

`train_lib.train` runs a `TrainConfig`; `train_config.json` in the run directory records it (the
evaluate and sample CLIs read the dataset settings back with `load_train_config` and
`data_config_from_json`). `OptimConfig` lives in `optim_config.py` and the errors in
`train_errors.py`; both are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional, Sequence

import tensorflow as tf

from tf_denseflow import data as data_lib
from tf_denseflow.checks import INT32_MAX, INT64_MAX, INT64_MIN, MAX_CPU_DEVICES, MAX_STEPS
from tf_denseflow.cluster import STRATEGIES
from tf_denseflow.config import COUPLING_DTYPES as PRECISIONS
from tf_denseflow.config import DenseFlowConfig
from tf_denseflow.config_flags import check_fields, hparam, values_from_flags
from tf_denseflow.grappler import GRAPPLER
from tf_denseflow.kernels import CONV_KERNELS
from tf_denseflow.optim import WarmupSchedule  # noqa: F401 -- re-exported: the schedule of OptimConfig
from tf_denseflow.optim_config import LR_SCHEDULES, OptimConfig  # noqa: F401 -- re-exported
from tf_denseflow.train_errors import (  # noqa: F401 -- re-exported: the errors of a run
  ConfigError,
  TrainingError,
  WorkerLostError,
)
from tf_denseflow.workdir import (  # noqa: F401 -- re-exported: the run directory's file names
  METRICS_FILE,
  TB_SUBDIR,
  TRAIN_CONFIG_FILE,
)

__all__ = [
  'LR_SCHEDULES',
  'NOISE_SEEDINGS',
  'ConfigError',
  'METRICS_FILE',
  'OptimConfig',
  'TB_SUBDIR',
  'TRAIN_CONFIG_FILE',
  'TrainConfig',
  'TrainingError',
  'WorkerLostError',
  'data_config_from_json',
  'load_train_config',
  'model_config_from_flags',
]


NOISE_SEEDINGS = ('global_batch', 'per_replica')


# -------------------------------------------------------------------------------------------------
# Configs.


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run needs; built from flags by `from_flags`, or directly in tests.

  Attributes:
    model: the architecture (its `image_shape` must match the data).
    data: what to train and evaluate on.
    optim: the optimisation recipe.
    seed: seed of the weights, the data order and every noise draw.
    noise_seeding: 'global_batch' (replica-count invariant) or 'per_replica'.
    init_examples: images of ActNorm's data-dependent initialisation (glow's `n_batch_init`):
      the first `init_examples` images of the training stream, in one pass (None: the first
      global batch, `optim.global_batch_size`).
    jit_compile: XLA-compile the per-replica loss-and-gradient function.
    precision: compute dtype of the conditioner networks (coupling, cross-unit, dequantization;
      'float32', 'bfloat16', 'float16'), always
      equal to `model.coupling_dtype` (None at construction: taken from the model); 'float16'
      trains with a `precision.DynamicLossScale`.
    conv_kernels: 'auto', 'cpu' or 'library' (`tf_denseflow.kernels`).
    grappler: 'auto', 'on' or 'off': TensorFlow's graph optimizer for the run's functions
      (`tf_denseflow.grappler`; 'auto' leaves it out of the training step's own graph on the
      'cpu' kernels without XLA, 'off' out of every function: quicker starts, more memory).
    steps_per_loop: training steps per `tf.function` call (orbit's inner loop): one host sync
      per `steps_per_loop` steps, so an accelerator is not idled by the host every step.
      Logging, evaluation, checkpoint and sample intervals are rounded to whole loops.
    num_cpu_devices: train on this many logical CPU devices (0: all GPUs, else one CPU).
    strategy: 'auto', 'mirrored', 'one_device' or 'multi_worker' (`cluster.make_strategy`).
    cluster_wait_s: multi-worker start-up limit, seconds (0: none).
    collective_timeout_s: multi-worker limit of one collective's wait, seconds (0: none).
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
  # Every field but model, data and optim is also a flag of `python -m tf_denseflow.train`
  # (config_flags; `--seed` is shared with evaluate and sample); `__post_init__` checks the
  # bounds of their `hparam` declarations.
  seed: int = hparam(
    0,
    'Seed of the weights, the data order and every noise draw (stateless, so runs repeat).',
    minimum=INT64_MIN,
    maximum=INT64_MAX,
  )
  noise_seeding: str = hparam(
    'global_batch',
    'global_batch: every replica draws the noise of the whole global batch from (seed, step) '
    'and keeps its slice, so the run does not depend on the number of replicas; per_replica: '
    'fold the replica id into the step seed (cheaper, depends on the replica count).',
    choices=NOISE_SEEDINGS,
  )
  init_examples: Optional[int] = hparam(
    None,
    "Images of ActNorm's data-dependent initialisation (glow's n_batch_init): the first "
    'init_examples images of the training stream, with the seed, shuffle and augmentation of '
    'training (e.g. 2 x --global_batch_size: the images of the first two steps), in one forward '
    'pass whose memory grows with them; default: --global_batch_size (the first training '
    'batch, as the official code). Not used when resuming.',
    minimum=1,
  )
  jit_compile: bool = hparam(
    False,
    'XLA-compile the per-replica loss-and-gradient function (GPU or CPU devices; see '
    'docs/benchmarks.md for when it pays off).',
  )
  precision: Optional[str] = hparam(
    None,
    'Compute dtype of the conditioner networks (coupling, cross-unit, dequantization): float32, '
    'bfloat16, or float16 (trained with '
    'dynamic loss scaling); weights, batch-norm statistics and the bijector math stay float32. '
    "Sets the model's coupling_dtype (default: --coupling_dtype, float32).",
    choices=PRECISIONS,
  )
  conv_kernels: str = hparam(
    'auto',
    'Convolution kernels: cpu (matmul-based, measured faster on CPUs), library (tf.nn.conv2d, '
    'cuDNN on GPUs), auto = library when a GPU is visible, else cpu (tf_denseflow.kernels).',
    choices=CONV_KERNELS,
  )
  grappler: str = hparam(
    'auto',
    "TensorFlow's graph optimizer (grappler) for the functions the program runs: auto (off "
    "for the training step's own graph on the CPU kernels without XLA, where it buys no step "
    "time and costs much of its first call; on for the networks and elsewhere), on (TF's "
    'default everywhere) or off (everywhere: a quicker first evaluation and sampling call, '
    'more memory; tf_denseflow.grappler).',
    choices=GRAPPLER,
  )
  steps_per_loop: int = hparam(
    1,
    "Training steps per tf.function call (orbit's inner loop): one host sync per loop, so an "
    'accelerator is not idled by the host every step; intervals are rounded to whole loops.',
    minimum=1,
    maximum=MAX_STEPS,
  )
  num_cpu_devices: int = hparam(
    0,
    'Split the CPU into this many logical devices and train on them with MirroredStrategy '
    '(multi-replica runs without GPUs); 0 = all GPUs, or the CPU when there is none.',
    minimum=0,
    maximum=MAX_CPU_DEVICES,
  )
  strategy: str = hparam(
    'auto',
    'auto: multi_worker when TF_CONFIG names a cluster (or a Slurm job has several tasks), '
    'else mirrored; mirrored: all local GPUs (or the CPU); one_device: the first GPU (or the '
    'CPU); multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG (docs/distributed.md).',
    choices=STRATEGIES,
  )
  cluster_wait_s: int = hparam(
    600,
    'Multi-worker: seconds to wait at start-up for every worker of the cluster (then stop with '
    'an error); 0 = no limit.',
    minimum=0,
    maximum=INT32_MAX,
  )
  collective_timeout_s: int = hparam(
    1800,
    'Multi-worker: seconds a collective may wait for the other workers (a hung worker; a dead '
    'one is noticed in about 10 s); it must exceed the longest pause of the chief alone (first '
    'trace, sample grids); 0 = no limit.',
    minimum=0,
    maximum=INT32_MAX,
  )
  checkpoint_every: int = hparam(
    2000,
    'Save a checkpoint every this many steps (and always at the end or on interruption).',
    minimum=1,
    maximum=MAX_STEPS,
  )
  keep_checkpoints: int = hparam(3, 'Number of most recent checkpoints to keep.', minimum=1)
  eval_every: int = hparam(
    7820,
    'Test-split ELBO bits/dim every this many steps (and at the end); 0 = only at the end.',
    minimum=0,
    maximum=MAX_STEPS,
  )
  eval_examples: Optional[int] = hparam(
    None,
    'Test examples per evaluation (default: the whole split; 0 = no evaluation).',
    minimum=0,
    maximum=INT64_MAX,
  )
  eval_batch_size: Optional[int] = hparam(
    None, 'Global batch of the evaluation (default: --global_batch_size).', minimum=1
  )
  log_every: int = hparam(
    100,
    'Write training scalars (TensorBoard, metrics.jsonl) every this many steps.',
    minimum=1,
    maximum=MAX_STEPS,
  )
  sample_every: int = hparam(
    7820,
    'Write a sample grid to TensorBoard every this many steps (and a PNG at the end); 0 = '
    'only at the end.',
    minimum=0,
    maximum=MAX_STEPS,
  )
  num_grid_samples: int = hparam(64, 'Samples per grid; 0 = no samples.', minimum=0)
  sample_temperature: float = hparam(
    1.0,
    'Temperature of the sample grids (std of the latents; the official sampler uses 1).',
    minimum=0.0,
  )
  export_dir: Optional[str] = hparam(
    None,
    'Export a SavedModel here after training (implies --export); versions are EXPORT_DIR/N.',
  )
  progress_bar: bool = hparam(True, 'Show a tqdm progress bar.')

  def __post_init__(self):
    check_fields(self, ConfigError)
    if self.precision is None:  # frozen: the effective precision is recorded either way
      object.__setattr__(self, 'precision', self.model.coupling_dtype)
    elif self.precision != self.model.coupling_dtype:
      raise ConfigError(
        f'--precision={self.precision} disagrees with the model coupling_dtype '
        f'{self.model.coupling_dtype!r}; give one of the two.'
      )
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
        **values_from_flags(data_lib.DataConfig, fv), data_dir=fv.data_dir, seed=0
      )
      image_shape = data_lib.image_shape(data)
    except (ValueError, data_lib.DatasetNotFoundError) as e:
      raise ConfigError(str(e)) from None
    model = model_config_from_flags(fv, image_shape)
    values = values_from_flags(cls, fv)
    if values.get('precision') is not None and values['precision'] != model.coupling_dtype:
      if 'coupling_dtype' in fv and not fv['coupling_dtype'].using_default_value:
        raise ConfigError(
          f'--precision={values["precision"]} and --coupling_dtype={fv.coupling_dtype} disagree; '
          'give one of the two.'
        )
      model = dataclasses.replace(model, coupling_dtype=values['precision'])
    if fv.export and not values.get('export_dir'):
      values['export_dir'] = os.path.join(fv.workdir, 'export') if fv.workdir else None
    optim = OptimConfig(**values_from_flags(OptimConfig, fv))
    return cls(model=model, data=data, optim=optim, **values)

  def to_json(self) -> Dict:
    """A JSON-ready dict of every setting."""
    return dataclasses.asdict(self)


def model_config_from_flags(flag_values, image_shape: Sequence[int]) -> DenseFlowConfig:
  """`--model_preset` plus the explicitly given model flags, as a `DenseFlowConfig`.

  Raises:
    ConfigError: the combination is not a valid architecture (the message names the field).
  """
  fv = flag_values
  try:
    values = values_from_flags(DenseFlowConfig, fv, explicit_only=fv.model_preset != 'custom')
  except ValueError as e:
    raise ConfigError(str(e)) from None
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
