"""Export a DenseFlow as a TF Serving SavedModel: versioned, atomic, from a training workdir.

```
python -m tf_denseflow.export --workdir=runs/in64 --export_dir=serving/denseflow [--version=N]
tensorflow_model_server --model_base_path=$PWD/serving/denseflow --model_name=denseflow
```
writes `EXPORT_DIR/<version>/` (`saved_model.pb`, `variables/`, `assets.extra/denseflow.json`)
from the workdir's latest checkpoint. The signatures are `tf_denseflow.serving`'s (docs/serving.md):
`serving_default` (`images` -> `elbo`, `bits_per_dim`), `log_prob_bound` (`images`, `seed`,
`num_importance_samples` -> `log_prob_bound`, `bits_per_dim`) and `sample` (`seed`,
`temperature` -> `images`), every row a function of that row's inputs alone.

Grcic, Grubisic, Segvic. Densely connected normalizing flows. NeurIPS 2021.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
from typing import Optional, Sequence

import tensorflow as tf
from absl import app, flags, logging

from tf_denseflow import checks
from tf_denseflow import flags as flags_lib
from tf_denseflow import workdir as workdir_lib
from tf_denseflow.flags import define_export_flags
from tf_denseflow.model import DenseFlow
from tf_denseflow.serving import DenseFlowServingModule, content_seeds, serving_variables

__all__ = [
  'DenseFlowServingModule',  # re-exported from tf_denseflow.serving
  'METADATA_FILE',
  'content_seeds',  # re-exported from tf_denseflow.serving
  'define_export_flags',  # re-exported from tf_denseflow.flags (where every flag is defined)
  'export_saved_model',
  'main',
  'next_version',
  'run',
]

METADATA_FILE = os.path.join('assets.extra', 'denseflow.json')
_VERSION_RE = re.compile(r'^\d+$')

FLAGS = flags.FLAGS


# -------------------------------------------------------------------------------------------------
# Writing version directories.


def next_version(export_dir: str) -> int:
  """One more than the largest integer version directory in `export_dir` (1 if there is none)."""
  if not tf.io.gfile.isdir(export_dir):
    return 1
  versions = [
    int(n.rstrip('/')) for n in tf.io.gfile.listdir(export_dir) if _VERSION_RE.match(n.rstrip('/'))
  ]
  return max(versions, default=0) + 1


def _check_new_version(export_dir: str, version: int) -> int:
  version = checks.check_int('version', version, 0, checks.INT64_MAX)
  path = os.path.join(export_dir, str(version))
  if tf.io.gfile.exists(path):
    raise FileExistsError(f'{path!r} exists; versions are never overwritten.')
  return version


def export_saved_model(
  model: DenseFlow,
  export_dir: str,
  version: Optional[int] = None,
  step: Optional[int] = None,
  max_num_samples: int = 4096,
  max_rows_per_step: int = 64,
) -> str:
  """Writes `model` as a TF Serving SavedModel `export_dir/<version>/`; returns that directory.

  The SavedModel is written to a hidden temporary directory in `export_dir` (TF Serving only
  looks at all-digit names) and renamed into place, so a server polling `export_dir` never sees
  a partial version (on a local or POSIX file system; object stores such as GCS copy on rename).

  Args:
    model: an initialised `DenseFlow` (ActNorm initialised from data or restored).
    export_dir: the model base path TF Serving watches.
    version: the version number; default `next_version(export_dir)`, so the newest export is
      the one TF Serving's default policy (latest version) serves.
    step: the training step of the weights, recorded in `assets.extra/denseflow.json`.
    max_num_samples: see `DenseFlowServingModule`.
    max_rows_per_step: see `DenseFlowServingModule`.

  Returns:
    The path of the new version directory.

  Raises:
    ValueError: `model` is not initialised, holds a non-finite weight (nothing is written), or
      `version` is negative.
    FileExistsError: `export_dir/<version>` already exists (versions are never overwritten).
  """
  if not model.is_initialized:
    raise ValueError(
      'The model is not initialised: call `model.initialize(images)` or restore a checkpoint '
      'before exporting.'
    )
  # The exported variables are the model's own float32 variables (no cast on the way out).
  bad = workdir_lib.nonfinite_variables(serving_variables(model))
  if bad:
    raise ValueError(f'Not exporting non-finite weights: {", ".join(bad[:3])}.')
  if version is not None:
    version = _check_new_version(export_dir, version)
  module = DenseFlowServingModule(model, max_num_samples, max_rows_per_step)
  tf.io.gfile.makedirs(export_dir)
  tmp = os.path.join(export_dir, f'.tmp-{uuid.uuid4().hex}')
  try:
    tf.saved_model.save(
      module,
      tmp,
      signatures=module.signatures,
      options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
    )
    metadata = {
      'config': dataclasses.asdict(model.config),
      'step': step,
      'signatures': sorted(module.signatures),
      'max_num_samples': max_num_samples,
      'tensorflow_version': tf.__version__,
    }
    tf.io.gfile.makedirs(os.path.join(tmp, os.path.dirname(METADATA_FILE)))
    with tf.io.gfile.GFile(os.path.join(tmp, METADATA_FILE), 'w') as f:
      json.dump(metadata, f, indent=2, sort_keys=True)
    return _rename_into_place(tmp, export_dir, version)
  finally:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.rmtree(tmp)


def _rename_into_place(tmp: str, export_dir: str, version: Optional[int]) -> str:
  """Renames the written `tmp` to `export_dir/<version>` (default: the next free number).

  Raises:
    FileExistsError: the version exists (with the default, after 10 numbers taken concurrently).
  """
  # A concurrent export may claim the number first: the rename then fails and, with the
  # default version, the next free number is tried.
  for _ in range(10 if version is None else 1):
    target = os.path.join(export_dir, str(next_version(export_dir) if version is None else version))
    try:
      tf.io.gfile.rename(tmp, target, overwrite=False)
      return target
    except (tf.errors.AlreadyExistsError, tf.errors.FailedPreconditionError) as err:
      error = err
  raise FileExistsError(f'{target!r} exists; versions are never overwritten.') from error


# -------------------------------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str]) -> None:
  """Exports the workdir's checkpoint; bad input ends it with one `error: ...` line, exit 2."""
  if len(argv) > 1:
    flags_lib.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  for name in ('workdir', 'export_dir'):
    if not FLAGS[name].value:
      flags_lib.fail(f'--{name} is required.')
  try:
    if FLAGS.version is not None:
      _check_new_version(FLAGS.export_dir, FLAGS.version)  # before the (slow) restore
    model, step = workdir_lib.restore_model(FLAGS.workdir, FLAGS.checkpoint)
    path = export_saved_model(
      model,
      FLAGS.export_dir,
      version=FLAGS.version,
      step=step,
      max_num_samples=FLAGS.max_num_samples,
      max_rows_per_step=FLAGS.max_rows_per_step,
    )
  except (ValueError, TypeError, OSError) as e:  # CheckpointError is a ValueError
    flags_lib.fail(str(e))
  except (tf.errors.PermissionDeniedError, tf.errors.FailedPreconditionError) as e:
    flags_lib.fail(f'--export_dir={FLAGS.export_dir}: cannot write there ({e.message}).')
  logging.info('Exported step %d of %s to %s', step, FLAGS.workdir, path)
  print(path)


def run() -> None:
  """Defines the flags and runs `main` (the `python -m tf_denseflow.export` entry point)."""
  define_export_flags()
  app.run(main, flags_parser=flags_lib.parse_flags)


if __name__ == '__main__':
  run()
