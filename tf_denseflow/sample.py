r"""Samples from a trained run as a PNG grid.

```
python -m tf_denseflow.sample --workdir=runs/cifar10 --num=64 --temperature=0.8 --seed=1 \
    --out=grid.png
```
Draws `--num` samples with the latents' std scaled by `--temperature` (the official sampler uses
1; the paper reportedly 0.8), from the stateless seed `(seed, 0)`, so a command always gives the
same grid. Prints the PNG path (default `WORKDIR/samples_t<T>_seed<S>.png`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf
from absl import app, flags

from tf_denseflow import checks, grappler, summaries
from tf_denseflow import flags as flags_lib
from tf_denseflow import workdir as workdir_lib

__all__ = ['main', 'sample_grid']

FLAGS = flags.FLAGS


def sample_grid(
  workdir: str,
  num: int = 64,
  *,
  temperature: float = 1.0,
  seed: int = 0,
  out: Optional[str] = None,
  columns: Optional[int] = None,
  checkpoint: Optional[str] = None,
) -> str:
  """Writes a grid of `num` samples of the run's checkpoint as a PNG; returns its path.

  Args:
    workdir: the run directory.
    num: number of samples.
    temperature: std of the latents.
    seed: sampling seed (stateless: the same seed gives the same images).
    out: PNG path (default `WORKDIR/samples_t<T>_seed<S>.png`).
    columns: images per row (default about `sqrt(num)`).
    checkpoint: checkpoint prefix (default: the latest).

  Returns:
    The PNG path.

  Raises:
    ValueError, TypeError: a bad argument (the message names it).
    FileNotFoundError: no model config or checkpoint in the workdir.
    OSError: the PNG cannot be written.
    workdir.CheckpointError: the checkpoint does not fit the workdir's model (a ValueError).
  """
  num = checks.check_int('num', num, 1, flags_lib.INT32_MAX)
  temperature = checks.check_float('temperature', temperature, 0.0, maximum=flags_lib.FLOAT32_MAX)
  seed = checks.check_int('seed', seed, flags_lib.INT64_MIN, flags_lib.INT64_MAX)
  if columns is not None:
    columns = checks.check_int('columns', columns, 1, flags_lib.INT32_MAX)
  model, _ = workdir_lib.restore_model(workdir, checkpoint)
  draw = tf.function(lambda s: model.sample(num, s, temperature), autograph=False)
  images = draw(tf.constant([seed, 0], tf.int64)).numpy()
  out = out or workdir_lib.sample_grid_path(workdir, temperature, seed)
  grid = summaries.image_grid(images, columns)
  try:
    return summaries.save_png(grid, out)
  except (tf.errors.OpError, OSError) as e:
    raise OSError(f'cannot write the grid to {out}: {getattr(e, "message", None) or e}') from None


def main(argv: Sequence[str]) -> None:
  flags_lib.start_main(argv, FLAGS)
  try:
    grappler.set_grappler(FLAGS.grappler)  # before any function is first called
    path = sample_grid(
      FLAGS.workdir,
      FLAGS.num,
      temperature=FLAGS.temperature,
      seed=FLAGS.seed,
      out=FLAGS.out,
      columns=FLAGS.columns,
      checkpoint=FLAGS.checkpoint,
    )
  except (ValueError, TypeError, OSError) as e:  # CheckpointError is a ValueError
    flags_lib.fail(str(e))
  print(path)


def run() -> None:
  """Defines the flags and runs `main` (the `python -m tf_denseflow.sample` entry point)."""
  flags_lib.define_sample_flags()
  app.run(main, flags_parser=flags_lib.parse_flags)


if __name__ == '__main__':
  run()
