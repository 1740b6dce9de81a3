r"""Trains DenseFlow: `python -m tf_denseflow.train --flagfile=configs/<name>.cfg --workdir=DIR`.

```
python -m tf_denseflow.train --workdir=runs/default                  # the embedded default
python -m tf_denseflow.train --flagfile=configs/cifar10.cfg --workdir=runs/cifar10
python -m tf_denseflow.train --flagfile=configs/smoke.cfg --workdir=/tmp/smoke --num_cpu_devices=2
```
Run from the repository root (nested flagfiles are relative to the working directory). Flags
given after `--flagfile` override it. Without `--flagfile` and without `--dataset`, the
embedded default `configs/default.cfg` (next to the package) is read first, so the command above
trains the small model on the embedded photo patches, not the 130M-parameter CIFAR-10 model that
the flag defaults describe. Rerunning a command on the same `--workdir` resumes from its latest
checkpoint. The flags are in `tf_denseflow/flags.py`; the run is `train_lib.train` (set-up),
`train_loop.run` (the cadence) and `trainer.Trainer` (model, optimizer, compiled steps). With
`--export`/`--export_dir` this program exports the final checkpoint after training. Library INFO
logs are hidden unless `--verbosity` (`-v`) is given; `TF_CPP_MIN_LOG_LEVEL=2` (set by
`make demo`) also hides TensorFlow's C++ notices.

Exit codes: 0 done; 1 training failed (non-finite steps, missing data); 2 bad flags (one line on
stderr: `error: ...`); 130 interrupted (Ctrl-C; a checkpoint is saved); 143 stopped by SIGTERM
(a checkpoint is saved).
"""

from __future__ import annotations

import os
import sys
from typing import List, Sequence

from absl import app, flags, logging

from tf_denseflow import flags as flags_lib

__all__ = ['DEFAULT_FLAGFILE', 'main', 'with_default_flagfile']

FLAGS = flags.FLAGS
DEFAULT_FLAGFILE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'default.cfg'
)


def with_default_flagfile(argv: Sequence[str], default: str = DEFAULT_FLAGFILE) -> List[str]:
  """Puts `--flagfile=default` first when argv names neither a flagfile nor a dataset.

  Args:
    argv: the command line, program name first.
    default: the flagfile to read when none is given.

  Returns:
    The command line to parse (later flags override the inserted flagfile).

  Raises:
    FileNotFoundError: the default flagfile is needed but missing.
  """
  names = {a.lstrip('-').split('=', 1)[0] for a in argv[1:] if a.startswith('-')}
  if names & {'flagfile', 'dataset'} or names & {'help', 'helpfull', 'helpshort', '?'}:
    return list(argv)
  if not os.path.exists(default):
    raise FileNotFoundError(
      f'No --flagfile and no --dataset given, and the embedded default {default} is missing; '
      'pass --flagfile=configs/<name>.cfg.'
    )
  return [argv[0], f'--flagfile={default}', *argv[1:]]


def _parse(argv: List[str]) -> List[str]:
  """absl flags parser: one `error: ...` line and exit code 2 on bad flags."""
  try:
    argv = with_default_flagfile(argv)
  except FileNotFoundError as e:
    flags_lib.fail(str(e))
  return flags_lib.parse_flags(argv)


def main(argv: Sequence[str]) -> None:
  flags_lib.start_main(
    argv, FLAGS, '--workdir is required (the run directory: checkpoints, logs, samples).'
  )
  from tf_denseflow import data as data_lib
  from tf_denseflow import train_lib
  from tf_denseflow import workdir as workdir_lib

  try:
    # Before any TensorFlow op runs: logical devices cannot change afterwards.
    train_lib.configure_cpu_devices(FLAGS.num_cpu_devices)
    config = train_lib.TrainConfig.from_flags(FLAGS)
  except (train_lib.ConfigError, ValueError) as e:
    flags_lib.fail(str(e))
  logging.info('Config: %s', config.to_json())
  try:
    result = train_lib.train(config, FLAGS.workdir)
  except (train_lib.ConfigError, workdir_lib.CheckpointError, data_lib.DatasetNotFoundError) as e:
    flags_lib.fail(str(e))  # bad input, missing data included: one line, exit 2
  except train_lib.TrainingError as e:
    flags_lib.fail(str(e), code=1)
  except KeyboardInterrupt:
    sys.exit(130)
  if result.stopped_by:
    print(f'stopped by {result.stopped_by} at step {result.step}')
    print(f'checkpoint: {result.checkpoint}')
    print(_timing_line(result))
    sys.exit(143)
  if not result.is_chief:  # the chief evaluates, samples and exports for the run
    print(f'done at step {result.step} (not the chief: the chief writes {FLAGS.workdir})')
    return
  exported = _export(FLAGS.workdir, config.export_dir) if config.export_dir else None
  if result.test_bpd is not None:
    print(f'test bits/dim: {result.test_bpd:.4f} (single-sample ELBO, step {result.step})')
  print(f'checkpoint: {result.checkpoint}')
  print(_timing_line(result))
  if result.samples:
    print(f'samples: {result.samples}')
  if exported:
    print(f'export: {exported}')


def _timing_line(result) -> str:
  """Where the run's time went, one line (`train_loop.Reporter.timing`)."""
  t = result.timing
  steps = result.step - result.start_step
  rate = t['train_images_per_s']
  rate = f'; then {rate:.1f} images/s' if rate is not None else ''
  return (
    f'time: {t["wall_s"]:.0f} s = set-up {t["setup_s"]:.0f} s + {steps} steps '
    f'{t["train_s"] + t["first_call_s"]:.0f} s (first call {t["first_call_s"]:.0f} s{rate}) + '
    f'evaluation {t["eval_s"]:.0f} s + checkpoints {t["checkpoint_s"]:.0f} s + samples '
    f'{t["sample_s"]:.0f} s'
  )


def _export(workdir: str, export_dir: str) -> str:
  """Exports the workdir's latest checkpoint (restored outside the strategy) as a SavedModel.

  An export that cannot start (`tf_denseflow.export` not importable) fails with exit code 1: the
  checkpoint is saved and can be exported later.
  """
  from tf_denseflow import workdir as workdir_lib

  try:
    from tf_denseflow import export as export_lib
  except ImportError as e:
    flags_lib.fail(
      f'--export_dir is set but tf_denseflow.export cannot be imported ({e}); the checkpoint is '
      'saved, export it later with python -m tf_denseflow.export.',
      code=1,
    )
  model, step = workdir_lib.restore_model(workdir)
  return export_lib.export_saved_model(model, export_dir, step=step)


def run() -> None:
  """Defines the flags and runs `main` (the `python -m tf_denseflow.train` entry point)."""
  flags_lib.define_flags()
  app.run(main, flags_parser=_parse)


if __name__ == '__main__':
  run()
