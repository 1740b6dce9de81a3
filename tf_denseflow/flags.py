"""Command-line flags of the tf_denseflow programs: the one place where flags are defined.

Only the entry points call the `define_*` functions (`train.py` calls `define_flags`,
`evaluate.py` `define_evaluate_flags`, `sample.py` `define_sample_flags`, `export.py`
`define_export_flags`, `convert_torch.py` `define_convert_flags`); library code never reads
`FLAGS`, it takes the frozen configs that `train_lib.TrainConfig.from_flags` builds. Every flag
is optional, so tests can parse any subset.

The training flags are generated from the config dataclasses (`config_flags`): every field of
`DenseFlowConfig`, `OptimConfig`, `TrainConfig` and `DataConfig` declared with `hparam` is a flag
of the same name, whose default, help text, choices and bounds are the field's. So the defaults
are written once, in the configs: the CIFAR-10 values of the paper's official code
(DenseFlow-74-10, Adamax 1e-3, 5000 warm-up steps, batch 64, 400 + 20 epochs, `eta`
augmentation); experiment flagfiles in `configs/` state every result-affecting value anyway.
Only the flags that are no config field are written out here (`--model_preset`, `--export`, the
shared `--workdir`, `--checkpoint` and `--data_dir`, and the other programs' flags).

Each `define_*` function may be called more than once, and together in one process (tests):
a flag that is already defined is left as it is, so the programs share `--workdir`, `--seed`,
`--checkpoint` and `--data_dir` with the same meaning and default.

Every numeric flag is checked when it is parsed, and the error names it (docs/input_checks.md):
integers against their range (counts >= 0 or >= 1, all within the int32/int64 the graphs use),
floats with `define_float` (finite, in range, and representable in float32, the dtype they are
used in). Programs parse with `parse_flags`, so a bad value ends them with one `error: ...`
line and exit status 2 (`fail`).
"""

from __future__ import annotations

import logging as std_logging
import sys
from typing import Any, Callable, List, Optional, Sequence

from absl import flags
from absl import logging as absl_logging

from tf_denseflow import config_flags
from tf_denseflow.checks import (  # noqa: F401 -- re-exported: the programs' numeric ranges
  FLOAT32_MAX,
  FLOAT32_TINY,
  INT32_MAX,
  INT64_MAX,
  INT64_MIN,
  MAX_CPU_DEVICES,
  MAX_STEPS,
)
from tf_denseflow.config import PRESETS, DenseFlowConfig
from tf_denseflow.config_flags import define_float
from tf_denseflow.data.config import SPLITS, DataConfig
from tf_denseflow.train_config import OptimConfig, TrainConfig

__all__ = [
  'MODEL_FLAGS',
  'MODEL_PRESETS',
  'FLOAT32_MAX',
  'FLOAT32_TINY',
  'INT32_MAX',
  'INT64_MAX',
  'INT64_MIN',
  'MAX_STEPS',
  'define',
  'define_convert_flags',
  'define_evaluate_flags',
  'define_export_flags',
  'define_flags',
  'define_float',
  'define_sample_flags',
  'explicitly_set',
  'fail',
  'optional_value',
  'quiet_logs',
  'start_main',
  'parse_flags',
]

# `--model_preset`: a `DenseFlowConfig` preset, or custom (every model flag as it stands).
MODEL_PRESETS = (*PRESETS, 'custom')

# Flags that map one-to-one onto a `DenseFlowConfig` field (flag name -> field name). With a
# named `--model_preset`, only those given explicitly override the preset.
MODEL_FLAGS = config_flags.flag_fields(DenseFlowConfig)


def define(definer: Callable[..., Any], name: str, *args, **kwargs) -> None:
  """Defines a flag unless a flag of that name exists already (shared between programs)."""
  if name not in flags.FLAGS:
    definer(name, *args, **kwargs)


def _define_workdir() -> None:
  define(
    flags.DEFINE_string,
    'workdir',
    None,
    'Run directory: model_config.json, train_config.json, checkpoints/, tb/, samples. Required.',
  )


def _define_checkpoint() -> None:
  define(
    flags.DEFINE_string,
    'checkpoint',
    None,
    'Checkpoint prefix (default: the latest in WORKDIR/checkpoints).',
  )


def _define_common() -> None:
  _define_workdir()
  config_flags.define_from_dataclass(TrainConfig, only=('seed', 'grappler'))
  define(
    flags.DEFINE_string,
    'data_dir',
    None,
    'TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets; for the embedded '
    'dataset ~/.cache/tf_denseflow/tfds).',
  )


def define_flags() -> None:
  """Defines the flags of `python -m tf_denseflow.train` (defaults: the CIFAR-10 recipe).

  All but `--model_preset`, `--export` and the shared flags are generated from the fields of
  `DataConfig`, `DenseFlowConfig`, `OptimConfig` and `TrainConfig`.
  """
  _define_common()
  config_flags.define_from_dataclass(DataConfig)
  define(
    flags.DEFINE_enum,
    'model_preset',
    'denseflow_74_10',
    list(MODEL_PRESETS),
    'Architecture preset of DenseFlowConfig. With a named preset, the model flags given '
    'explicitly (command line or flagfile) override the preset; with custom, every model flag '
    'is used as it stands (their defaults are DenseFlow-74-10).',
  )
  config_flags.define_from_dataclass(DenseFlowConfig)
  config_flags.define_from_dataclass(OptimConfig)
  config_flags.define_from_dataclass(TrainConfig)
  define(
    flags.DEFINE_bool,
    'export',
    False,
    'After training, export a SavedModel for TF Serving to --export_dir (default: WORKDIR/export).',
  )


def define_evaluate_flags() -> None:
  """Defines the flags of `python -m tf_denseflow.evaluate`."""
  _define_common()
  define(
    flags.DEFINE_integer,
    'num_importance_samples',
    1000,
    'Importance samples K of the IWBO (official: 1000 CIFAR-10, 200 others); 1 = the ELBO.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'batch_size',
    64,
    'Test images per batch (official: 64).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'chunk_size',
    50,
    'Importance samples evaluated together: the batch is tiled this many times (official kbs: '
    '50 at 32x32, 25 at 64x64).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'max_examples',
    None,
    'Evaluate only the first this many examples of the split (default: all).',
    lower_bound=1,
    upper_bound=INT64_MAX,
  )
  define(flags.DEFINE_enum, 'split', 'test', sorted(SPLITS), 'Split to evaluate.')
  define(
    flags.DEFINE_string,
    'dataset',
    None,
    'Dataset to evaluate on (default: the one in WORKDIR/train_config.json).',
  )
  define(
    flags.DEFINE_integer,
    'image_size',
    None,
    'Image size of --dataset (default: the run or dataset size).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  _define_checkpoint()
  define(
    flags.DEFINE_string,
    'output',
    None,
    'JSON result file (default: WORKDIR/eval_<split>_k<K>.json).',
  )
  define(flags.DEFINE_bool, 'progress_bar', True, 'Show a tqdm progress bar.')


def define_sample_flags() -> None:
  """Defines the flags of `python -m tf_denseflow.sample`."""
  _define_common()
  define(
    flags.DEFINE_integer,
    'num',
    64,
    'Number of samples in the grid.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define_float(
    'temperature',
    1.0,
    'Std of the latents (paper samples reportedly at 0.8).',
    minimum=0.0,
  )
  define(
    flags.DEFINE_integer,
    'columns',
    None,
    'Images per grid row (default: about sqrt(num)).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_string,
    'out',
    None,
    'PNG path of the grid (default: WORKDIR/samples_t<T>_seed<S>.png).',
  )
  _define_checkpoint()


def define_export_flags() -> None:
  """Defines the flags of `python -m tf_denseflow.export`."""
  _define_workdir()
  _define_checkpoint()
  define(
    flags.DEFINE_string,
    'export_dir',
    None,
    'Model base path: versions are written as EXPORT_DIR/N.',
  )
  define(
    flags.DEFINE_integer,
    'version',
    None,
    'Version number; default: one more than the largest existing version (1 if none).',
    lower_bound=0,
    upper_bound=INT64_MAX,
  )
  define(
    flags.DEFINE_integer,
    'max_num_samples',
    4096,
    'Most draws one row of log_prob_bound may request.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'max_rows_per_step',
    64,
    'log_prob_bound evaluates about this many (image, draw) pairs per loop step.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )


def define_convert_flags() -> None:
  """Defines the flags of `python -m tf_denseflow.convert_torch`.

  Its `--checkpoint` (an official PyTorch file) and `--image_size` (not a dataset's) mean other
  things than the training programs' flags of those names.
  """
  define(flags.DEFINE_string, 'checkpoint', None, 'Official checkpoint: .pt (needs torch) or .npz.')
  define(flags.DEFINE_string, 'out', None, 'Workdir to write (model_config.json + checkpoints/).')
  define(
    flags.DEFINE_integer,
    'image_size',
    None,
    'Image height = width in pixels (32 or 64 officially).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(flags.DEFINE_enum, 'preset', None, list(PRESETS), 'Require (and complete) this preset.')
  define(
    flags.DEFINE_integer,
    'step',
    0,
    'Global step recorded in the checkpoint.',
    lower_bound=0,
    upper_bound=INT64_MAX,
  )
  define(flags.DEFINE_bool, 'strict', True, 'Refuse state_dict keys without a variable here.')
  define(flags.DEFINE_bool, 'overwrite', False, 'Allow --out to hold a model already.')


def fail(message: str, code: int = 2) -> None:
  """Ends an entry point with one `error: ...` line on stderr (exit 2: bad flags or input).

  Every program (train, evaluate, sample, export, convert_torch, bench) ends this way on bad
  input; the message is folded onto one line.
  """
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(code)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> List[str]:
  """absl's flags parser for `app.run(..., flags_parser=...)`: `fail` on a bad flag."""
  try:
    return flag_values(list(argv))
  except flags.Error as e:
    fail(str(e))


def start_main(
  argv: Sequence[str],
  flag_values: flags.FlagValues = flags.FLAGS,
  workdir_message: str = '--workdir is required.',
) -> None:
  """The start of a program's `main`: `quiet_logs`, no stray arguments, a `--workdir`.

  Args:
    argv: what absl left of the command line (the program name first).
    flag_values: the parsed flags (with a `workdir` flag).
    workdir_message: the one-line error when `--workdir` is empty.
  """
  quiet_logs(flag_values)
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not flag_values.workdir:
    fail(workdir_message)


def quiet_logs(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Hides the libraries' INFO logs (TF, TFDS, Keras) unless `--verbosity`/`-v` was given.

  Called first in every program's `main`, so a user sees the progress bar, the results and real
  warnings. TensorFlow's C++ logs follow `TF_CPP_MIN_LOG_LEVEL`, which TensorFlow reads when it
  is imported (before any program code runs; `make demo` sets it to 2).
  """
  # Not `explicitly_set`: absl's app.run assigns the flag itself; `present` counts the user's.
  if 'verbosity' in flag_values and flag_values['verbosity'].present:
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  std_logging.getLogger('tensorflow').setLevel(std_logging.WARNING)


def explicitly_set(flag_values: flags.FlagValues, name: str) -> bool:
  """Whether `name` was given on the command line, in a flagfile or set by a test."""
  return name in flag_values and not flag_values[name].using_default_value


def optional_value(flag_values: flags.FlagValues, name: str, default: Optional[Any] = None) -> Any:
  """The flag's value if it is defined, else `default`."""
  return flag_values[name].value if name in flag_values else default
