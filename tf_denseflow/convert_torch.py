"""Convert an official DenseFlow PyTorch checkpoint into a tf_denseflow workdir.

```
python -m tf_denseflow.convert_torch --checkpoint=check/checkpoint.pt --image_size=32 \
    --out=runs/cifar10_official [--preset=denseflow_74_10] [--step=N]
```
reads the authors' checkpoint (`.pt` through `torch.load(..., weights_only=True)`: `{'model':
state_dict, 'optimizer': ..., ...}` or a bare state_dict; or an `.npz` of the state_dict, keys
optionally prefixed `param/`), infers the architecture from the key names and shapes, maps every
key onto the model's variables and writes `OUT/model_config.json` + `OUT/checkpoints/ckpt-STEP`,
the layout that `tf_denseflow.evaluate`, `sample` and `export` restore (`workdir.restore_model`).
A missing, unexpected, mis-shaped or non-finite (in float32) key is refused with a one-line
`error: ...` (exit code 2), as is a damaged file; nothing is written then.

The pieces, one module each (their names are re-exported here):
```
torch_reader.py   read_state_dict           .pt / .npz -> official key -> numpy array
torch_config.py   config_from_state_dict    key names and shapes -> DenseFlowConfig
torch_keys.py     official_key_map          official key -> (variable, layout change)
                  load_state_dict           checks every key, then assigns them all
```
docs/parity.md lists every place where matching the official model needed a special case.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np
from absl import app, flags, logging

from tf_denseflow import checks, workdir
from tf_denseflow import flags as flags_lib
from tf_denseflow.checks import INT32_MAX, INT64_MAX
from tf_denseflow.flags import define_convert_flags
from tf_denseflow.model import DenseFlow
from tf_denseflow.torch_config import check_preset, config_from_state_dict, preset_config
from tf_denseflow.torch_keys import ConversionError, load_state_dict, official_key_map
from tf_denseflow.torch_reader import read_state_dict

__all__ = [
  'ConversionError',  # re-exported from torch_keys
  'config_from_state_dict',  # re-exported from torch_config
  'convert_checkpoint',
  'define_convert_flags',  # re-exported from tf_denseflow.flags (where every flag is defined)
  'load_state_dict',  # re-exported from torch_keys
  'main',
  'official_key_map',  # re-exported from torch_keys
  'read_state_dict',  # re-exported from torch_reader
  'run',
]

FLAGS = flags.FLAGS


def convert_checkpoint(
  checkpoint: str,
  out: str,
  image_size: Sequence[int] | int,
  preset: Optional[str] = None,
  step: Optional[int] = None,
  strict: bool = True,
  overwrite: bool = False,
  log: Callable[[str], None] = print,
) -> str:
  """Converts an official checkpoint into the workdir `out`; returns the checkpoint path.

  Args:
    checkpoint: `.pt` or `.npz` file (see `read_state_dict`).
    out: the workdir to write (`model_config.json`, `checkpoints/ckpt-STEP`).
    image_size: `H` (square images) or `(H, W)`: the dataset's, not stored in the checkpoint.
    preset: optional `DenseFlowConfig` preset name; the checkpoint must match it, and it
      supplies the fields that the keys cannot tell (e.g. `attention_landmarks`).
    step: the global step to record (default 0).
    strict: refuse state_dict keys the model has no variable for.
    overwrite: allow `out` to hold a model already.
    log: progress output.

  Raises:
    ConversionError, FileNotFoundError: see `read_state_dict`, `config_from_state_dict` and
      `load_state_dict`; or `out` already holds a model (without `overwrite`).
    ValueError, TypeError: a bad `image_size` or `step` (the message names it).
    workdir.CheckpointError: a weight is non-finite after the assignment (nothing written).
  """
  if not overwrite and os.path.exists(os.path.join(out, workdir.CONFIG_FILE)):
    raise ConversionError(f'{out} already holds a model; pass --overwrite or choose another --out.')
  sizes = [image_size] * 2 if np.ndim(image_size) == 0 else list(image_size)
  hw = tuple(checks.check_int('image_size', v, 1, INT32_MAX) for v in sizes)
  step = checks.check_int('step', 0 if step is None else step, 0, INT64_MAX)
  state, info = read_state_dict(checkpoint)
  log(
    f'Read {len(state)} arrays from {checkpoint}'
    + (f' (epoch {info["current_epoch"]})' if info else '')
  )
  inferred = config_from_state_dict(state, hw)
  config = inferred
  if preset:
    config = preset_config(preset, inferred.image_shape)
    check_preset(config, inferred)
  model = DenseFlow(config)
  assigned = load_state_dict(model, state, strict=strict)
  log(
    f'Mapped {len(assigned)} keys onto {model.num_parameters():,} parameters: '
    f'units {config.units_per_block}, steps {config.steps_per_unit}, widths '
    f'{config.coupling_channels}, growth {config.growth_rate}, image {config.image_shape}'
  )
  # write_model_checkpoint refuses non-finite weights (checked again after the assignment).
  path = workdir.write_model_checkpoint(out, model, step=step)
  log(f'Wrote {path}')
  return path


def main(argv: Sequence[str]) -> None:
  """The `python -m tf_denseflow.convert_torch` entry point (absl).

  Bad input (missing, unreadable or damaged file, a state_dict that does not fit, bad flags)
  ends it with one `error: ...` line on stderr and exit status 2, as every program here.
  """
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    flags_lib.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  for name in ('checkpoint', 'out', 'image_size'):
    if FLAGS[name].value is None:
      flags_lib.fail(f'--{name} is required.')
  try:
    convert_checkpoint(
      FLAGS.checkpoint,
      FLAGS.out,
      FLAGS.image_size,
      preset=FLAGS.preset,
      step=FLAGS.step,
      strict=FLAGS.strict,
      overwrite=FLAGS.overwrite,
    )
  except (ValueError, TypeError, OSError) as e:  # ConversionError, CheckpointError: ValueErrors
    flags_lib.fail(str(e))


def run() -> None:
  """Defines the flags and runs `main` (the `python -m tf_denseflow.convert_torch` entry point)."""
  define_convert_flags()
  app.run(main, flags_parser=flags_lib.parse_flags)


if __name__ == '__main__':
  run()
