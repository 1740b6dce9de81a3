"""The layout of a run directory: model config, checkpoints, and restoring a model from them.

```
WORKDIR/model_config.json      DenseFlowConfig as JSON (written once, read by every program)
WORKDIR/checkpoints/ckpt-N.*   tf.train.Checkpoint(model=..., optimizer=..., step=..., ...)
```
Every program (train, evaluate, sample, export, convert_torch) goes through these functions, so
they agree on the checkpoint's object graph: the model is always saved under the key `model` and
the global step under `step`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Tuple

import tensorflow as tf

from tf_denseflow.config import DenseFlowConfig
from tf_denseflow.model import DenseFlow

__all__ = [
  'CHECKPOINT_SUBDIR',
  'CONFIG_FILE',
  'save_model_config',
  'load_model_config',
  'checkpoint_dir',
  'latest_checkpoint',
  'restore_model',
  'write_model_checkpoint',
]

CONFIG_FILE = 'model_config.json'
CHECKPOINT_SUBDIR = 'checkpoints'


def save_model_config(workdir: str, config: DenseFlowConfig) -> str:
  """Writes `config` to `WORKDIR/model_config.json` (atomically); returns the path."""
  tf.io.gfile.makedirs(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + '.tmp'
  with tf.io.gfile.GFile(tmp, 'w') as f:
    json.dump(dataclasses.asdict(config), f, indent=2, sort_keys=True)
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path


def load_model_config(workdir: str) -> DenseFlowConfig:
  """Reads `WORKDIR/model_config.json`; raises FileNotFoundError with a clear message."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
      f'No {CONFIG_FILE} in workdir {workdir!r}: is it the --workdir of a training run '
      '(python -m tf_denseflow.train) or of tf_denseflow.convert_torch?'
    )
  with tf.io.gfile.GFile(path) as f:
    fields = json.load(f)
  names = {f.name for f in dataclasses.fields(DenseFlowConfig)}
  return DenseFlowConfig(**{k: v for k, v in fields.items() if k in names})


def checkpoint_dir(workdir: str) -> str:
  """`WORKDIR/checkpoints`."""
  return os.path.join(workdir, CHECKPOINT_SUBDIR)


def latest_checkpoint(workdir: str) -> Optional[str]:
  """The newest checkpoint prefix in the workdir, or None."""
  return tf.train.latest_checkpoint(checkpoint_dir(workdir))


def restore_model(workdir: str, checkpoint: Optional[str] = None) -> Tuple[DenseFlow, int]:
  """Builds the workdir's model and restores its weights; returns `(model, step)`.

  Raises:
    FileNotFoundError: no config or no checkpoint in the workdir.
  """
  config = load_model_config(workdir)
  model = DenseFlow(config)
  path = checkpoint or latest_checkpoint(workdir)
  if path is None:
    raise FileNotFoundError(f'No checkpoint in {checkpoint_dir(workdir)!r}.')
  step = tf.Variable(0, dtype=tf.int64, trainable=False)
  tf.train.Checkpoint(model=model, step=step).restore(path).expect_partial()
  return model, int(step.numpy())


def write_model_checkpoint(workdir: str, model: DenseFlow, step: int = 0) -> str:
  """Saves `model` (config and weights) as a workdir checkpoint; returns the checkpoint path."""
  save_model_config(workdir, model.config)
  step_var = tf.Variable(step, dtype=tf.int64, trainable=False)
  manager = tf.train.CheckpointManager(
    tf.train.Checkpoint(model=model, step=step_var), checkpoint_dir(workdir), max_to_keep=3
  )
  return manager.save(checkpoint_number=step)
