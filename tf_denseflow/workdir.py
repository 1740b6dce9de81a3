"""The layout of a run directory: every file name, the resume checks, and one atomic write.

```
WORKDIR/model_config.json      DenseFlowConfig as JSON (written once, read by every program)
WORKDIR/train_config.json      every setting of the training run (evaluate/sample read the data)
WORKDIR/checkpoints/ckpt-N.*   tf.train.Checkpoint(model=..., step=..., model_config=..., ...)
WORKDIR/tb/                    TensorBoard scalars and sample grids
WORKDIR/metrics.jsonl          one JSON line per log/eval point of training, and one `timing`
                               line per training process at its end
WORKDIR/samples_stepN.png      training's final sample grid
WORKDIR/samples_tT_seedS.png   python -m tf_denseflow.sample's grid
WORKDIR/eval_SPLIT_kK.json     python -m tf_denseflow.evaluate's result
```
Every program (train, evaluate, sample, export, convert_torch) goes through these functions, so
they agree on the checkpoint's object graph: the model is always saved under the key `model`, the
global step under `step`, and the model config it was written for, as JSON, under `model_config`.
Restoring is all or nothing (`checkpoints.restore_checkpoint`, re-exported here). Every file is
written with `atomic_write` (a temporary file renamed over the target), so a killed program never
leaves half a file.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple, Union

import tensorflow as tf
from absl import logging

from tf_denseflow.checkpoints import (  # noqa: F401 -- re-exported: the workdir's checkpoint API
  MODEL_CONFIG_KEY,
  WEIGHT_NEUTRAL_FIELDS,
  CheckpointError,
  checkpoint_model_config,
  config_differences,
  config_from_fields,
  config_json,
  model_config_variable,
  nonfinite_variables,
  one_line,
  preview,
  restore_checkpoint,
)
from tf_denseflow.config import DenseFlowConfig
from tf_denseflow.model import DenseFlow

__all__ = [
  'CHECKPOINT_SUBDIR',
  'CONFIG_FILE',
  'CheckpointError',
  'METRICS_FILE',
  'MODEL_CONFIG_KEY',
  'TB_SUBDIR',
  'TRAIN_CONFIG_FILE',
  'WEIGHT_NEUTRAL_FIELDS',
  'atomic_write',
  'checkpoint_dir',
  'checkpoint_model_config',
  'config_differences',
  'eval_result_path',
  'latest_checkpoint',
  'load_model_config',
  'metrics_path',
  'model_config_variable',
  'nonfinite_variables',
  'prepare_train_workdir',
  'resolve_checkpoint',
  'restore_checkpoint',
  'restore_model',
  'sample_grid_path',
  'save_model_config',
  'tensorboard_dir',
  'train_samples_path',
  'write_model_checkpoint',
]

CONFIG_FILE = 'model_config.json'
TRAIN_CONFIG_FILE = 'train_config.json'
CHECKPOINT_SUBDIR = 'checkpoints'
METRICS_FILE = 'metrics.jsonl'
TB_SUBDIR = 'tb'
# Train settings that may differ on resume, but are worth a warning when they do.
_RESUME_WARNINGS = ('seed', 'noise_seeding')
_RESUME_OPTIM_WARNINGS = ('global_batch_size', 'train_steps', 'learning_rate')


# -------------------------------------------------------------------------------------------------
# File names and writing.


def checkpoint_dir(workdir: str) -> str:
  """`WORKDIR/checkpoints`."""
  return os.path.join(workdir, CHECKPOINT_SUBDIR)


def tensorboard_dir(workdir: str) -> str:
  """`WORKDIR/tb`: TensorBoard events."""
  return os.path.join(workdir, TB_SUBDIR)


def metrics_path(workdir: str) -> str:
  """`WORKDIR/metrics.jsonl`: training's log and evaluation records."""
  return os.path.join(workdir, METRICS_FILE)


def train_samples_path(workdir: str, step: int) -> str:
  """`WORKDIR/samples_step<step>.png`: the sample grid at the end of training."""
  return os.path.join(workdir, f'samples_step{step}.png')


def sample_grid_path(workdir: str, temperature: float, seed: int) -> str:
  """`WORKDIR/samples_t<temperature>_seed<seed>.png`: `python -m tf_denseflow.sample`'s grid."""
  return os.path.join(workdir, f'samples_t{temperature:g}_seed{seed}.png')


def eval_result_path(workdir: str, split: str, num_importance_samples: int) -> str:
  """`WORKDIR/eval_<split>_k<K>.json`: `python -m tf_denseflow.evaluate`'s result."""
  return os.path.join(workdir, f'eval_{split}_k{num_importance_samples}.json')


def atomic_write(path: str, contents: Union[str, bytes]) -> str:
  """Writes `contents` to `path` through `path.tmp` and a rename; returns `path`.

  Creates the directory. Works on any `tf.io.gfile` file system.

  Raises:
    OSError, tf.errors.OpError: the file cannot be written.
  """
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  tmp = f'{path}.tmp'
  with tf.io.gfile.GFile(tmp, 'wb' if isinstance(contents, bytes) else 'w') as f:
    f.write(contents)
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path


# -------------------------------------------------------------------------------------------------
# The model config.


def save_model_config(workdir: str, config: DenseFlowConfig) -> str:
  """Writes `config` to `WORKDIR/model_config.json` (atomically); returns the path."""
  return atomic_write(os.path.join(workdir, CONFIG_FILE), config_json(config))


def load_model_config(workdir: str) -> DenseFlowConfig:
  """Reads `WORKDIR/model_config.json`.

  Raises:
    FileNotFoundError: no config in the workdir.
    CheckpointError: the file is unreadable, not JSON or not a valid config (names the file).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
      f'No {CONFIG_FILE} in workdir {workdir!r}: is it the --workdir of a training run '
      '(python -m tf_denseflow.train) or of tf_denseflow.convert_torch?'
    )
  try:
    with tf.io.gfile.GFile(path) as f:
      fields = json.load(f)
  except (ValueError, OSError, tf.errors.OpError) as e:  # JSONDecodeError, UnicodeDecodeError
    raise CheckpointError(f'{path}: not a readable JSON model config ({one_line(e)}).') from None
  return config_from_fields(fields, path)


def prepare_train_workdir(
  workdir: str, config: DenseFlowConfig, train_config: Dict, previous: Dict, write: bool = True
) -> bool:
  """Checks the workdir's architecture against `config`, writes both configs; True if resuming.

  With `write=False` (the workers of a multi-worker run other than the chief) it only checks.

  Args:
    workdir: the run directory (created).
    config: the run's model config.
    train_config: the run's `TrainConfig.to_json()`, written to `train_config.json`.
    previous: the workdir's `train_config.json` as read (`{}` if none): resuming with another
      seed, batch size, schedule or data is allowed, with a warning.

  Raises:
    CheckpointError: the workdir holds a checkpoint of another architecture (fields other than
      `WEIGHT_NEUTRAL_FIELDS` differ), or its checkpoint state or config is unreadable.
    OSError, tf.errors.OpError: the workdir is not writable.
  """
  resuming = latest_checkpoint(workdir) is not None
  saved = None
  if tf.io.gfile.exists(os.path.join(workdir, CONFIG_FILE)):
    saved = load_model_config(workdir)
  if resuming and saved is not None:
    changed = [
      f'{k}: {_as_list(a)} in the workdir, {_as_list(b)} now'
      for k, a, b in config_differences(saved, config)
    ]
    if changed:
      raise CheckpointError(
        f'--workdir={workdir} holds a model with another architecture ('
        + '; '.join(changed)
        + '); use the flags of that run or a new --workdir.'
      )
  if resuming and previous:
    pairs = [(k, previous.get(k), train_config.get(k)) for k in _RESUME_WARNINGS]
    pairs += [
      (k, previous.get('optim', {}).get(k), train_config['optim'].get(k))
      for k in _RESUME_OPTIM_WARNINGS
    ]
    for key, was, now in pairs:
      if was != now:
        logging.warning('Resuming with %s=%s (was %s).', key, now, was)
    if previous.get('data') != train_config['data']:
      logging.warning(
        'Resuming with other data settings: %s (was %s).', train_config['data'], previous['data']
      )
  if not write:
    return resuming
  save_model_config(workdir, config)
  atomic_write(
    os.path.join(workdir, TRAIN_CONFIG_FILE), json.dumps(train_config, indent=2, sort_keys=True)
  )
  return resuming


def _as_list(value):
  """JSON's spelling of a config value (tuples as lists)."""
  return [_as_list(v) for v in value] if isinstance(value, (list, tuple)) else value


# -------------------------------------------------------------------------------------------------
# Finding checkpoints.


def latest_checkpoint(workdir: str) -> Optional[str]:
  """The newest checkpoint prefix in the workdir, or None.

  Raises:
    CheckpointError: the directory's `checkpoint` state file is unreadable.
  """
  directory = checkpoint_dir(workdir)
  state = os.path.join(directory, 'checkpoint')
  try:
    path = tf.train.latest_checkpoint(directory)
  except (tf.errors.OpError, ValueError) as e:  # text_format.ParseError is a ValueError
    raise CheckpointError(f'{state}: unreadable checkpoint state ({one_line(e)}).') from None
  if path is None and tf.io.gfile.exists(state):
    # TF ignores a state file it cannot parse, or whose latest checkpoint is gone: the run
    # would silently start over (and overwrite the checkpoints).
    raise CheckpointError(
      f'{state}: unreadable checkpoint state, or its latest checkpoint is missing; repair or '
      'remove it (the checkpoints are WORKDIR/checkpoints/ckpt-N.index).'
    )
  return path


def resolve_checkpoint(workdir: str, checkpoint: Optional[str] = None) -> str:
  """The checkpoint prefix to restore: `checkpoint` (a prefix or a directory) or the latest.

  Raises:
    FileNotFoundError: no checkpoint there.
  """
  if checkpoint is None:
    path = latest_checkpoint(workdir)
    if path is None:
      raise FileNotFoundError(f'No checkpoint in {checkpoint_dir(workdir)!r}.')
    return path
  if tf.io.gfile.isdir(checkpoint):
    path = tf.train.latest_checkpoint(checkpoint)
    if path is None:
      raise FileNotFoundError(f'--checkpoint={checkpoint}: a directory without a checkpoint.')
    return path
  if not tf.io.gfile.exists(checkpoint + '.index'):
    raise FileNotFoundError(
      f'--checkpoint={checkpoint}: no such checkpoint (no {checkpoint}.index); give a prefix '
      'such as WORKDIR/checkpoints/ckpt-N.'
    )
  return checkpoint


# -------------------------------------------------------------------------------------------------
# Restoring and writing a model.


def _all_variables(model: DenseFlow) -> list:
  return list(model.variables) + model.trainable_variables + model.non_trainable_keras_variables


def restore_model(workdir: str, checkpoint: Optional[str] = None) -> Tuple[DenseFlow, int]:
  """Builds the workdir's model and restores its weights; returns `(model, step)`.

  Only the model and the step are restored: the optimizer state a training checkpoint also holds
  is not needed to evaluate, sample or export, so it is legitimately left unread.

  Raises:
    FileNotFoundError: no config or no checkpoint in the workdir.
    CheckpointError: the checkpoint does not fit the workdir's model (see `restore_checkpoint`),
      is unreadable, or holds non-finite weights.
  """
  config = load_model_config(workdir)
  path = resolve_checkpoint(workdir, checkpoint)
  model = DenseFlow(config)
  step = tf.Variable(0, dtype=tf.int64, trainable=False)
  restore_checkpoint(
    path,
    {'model': model, 'step': step},
    config,
    config_source=os.path.join(workdir, CONFIG_FILE),
  )
  bad = nonfinite_variables(_all_variables(model))
  if bad:
    raise CheckpointError(f'checkpoint {path} holds non-finite weights: {preview(bad)}.')
  return model, int(step.numpy())


def write_model_checkpoint(workdir: str, model: DenseFlow, step: int = 0) -> str:
  """Saves `model` (config and weights) as a workdir checkpoint; returns the checkpoint path.

  Raises:
    CheckpointError: a weight is NaN or Inf (nothing is written), or the workdir is not
      writable.
  """
  bad = nonfinite_variables(_all_variables(model))
  if bad:
    raise CheckpointError(f'Not writing non-finite weights: {preview(bad)}.')
  step_var = tf.Variable(step, dtype=tf.int64, trainable=False)
  checkpoint = tf.train.Checkpoint(
    model=model, step=step_var, model_config=model_config_variable(model.config)
  )
  try:
    save_model_config(workdir, model.config)
    manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir(workdir), max_to_keep=3)
    return manager.save(checkpoint_number=step)
  except (tf.errors.OpError, OSError) as e:
    raise CheckpointError(f'cannot write the workdir {workdir}: {one_line(e)}') from None
