"""The stateless seed streams: one registry of what each `(seed, stream)` pair is used for.

Every random draw of the programs is stateless, derived from the run's `--seed` and a stream id
(the second word of the seed), so no two uses share numbers:
```
TRAIN_STREAM   1  training step t:         fold_in((seed, 1), int64(t))
EVAL_STREAM    2  evaluation batch k:      fold_in((seed, 2), int64(k))  (train's evaluation and
                                                                          python -m ...evaluate)
INIT_STREAM    3  ActNorm's data-dependent initialisation: (seed, 3)
SAMPLE_STREAM  4  the run's sample grids:  (seed, 4)
```
"""

from __future__ import annotations

import tensorflow as tf

__all__ = [
  'EVAL_STREAM',
  'INIT_STREAM',
  'SAMPLE_STREAM',
  'TRAIN_STREAM',
  'step_seed',
  'stream_seed',
]

TRAIN_STREAM, EVAL_STREAM, INIT_STREAM, SAMPLE_STREAM = 1, 2, 3, 4


def stream_seed(seed: int, stream: int) -> tf.Tensor:
  """The stream's base seed `[seed, stream]`, int64 `[2]`."""
  return tf.constant([seed, stream], tf.int64)


def step_seed(seed: int, step, stream: int = TRAIN_STREAM) -> tf.Tensor:
  """The stateless seed of step (or batch) `step` of a stream: `fold_in((seed, stream), step)`.

  Args:
    seed: the run's seed (Python int).
    step: the step or batch index (int, or a scalar tensor or variable of any integer dtype).
    stream: one of the `*_STREAM` ids.

  Returns:
    int64 `[2]`. The step is always folded in as int64 (`stateless_fold_in` draws in the dtype
    of the data, so int32 and int64 steps would give different seeds).
  """
  return tf.random.experimental.stateless_fold_in(
    stream_seed(seed, stream), tf.cast(step, tf.int64)
  )
