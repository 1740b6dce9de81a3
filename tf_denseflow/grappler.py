"""Whether TensorFlow's graph optimizer (grappler) runs on the functions a program instantiates.

Grappler rewrites every function graph when it is first called (pruning, constant folding,
arithmetic rewrites, op fusions), once per function. The programs (`train`, `evaluate`,
`sample`, `bench`) take `--grappler`, one of `GRAPPLER`:
- 'on' (default): TensorFlow's default.
- 'off': `disable_meta_optimizer`. Measured on a CPU with the 'cpu' convolution kernels
  (docs/benchmarks.md section 5.3): the same step time, a first training call about a quarter
  shorter, but more memory in evaluation and sampling (the graphs run unpruned and unfused),
  so it stays an option for quick starts (short runs, tests of a setup), not the default.

Process-wide (`tf.config.optimizer.set_experimental_options`) and read when a function is first
*called* (instantiated), not when it is traced: set it before the first call. Importing
tf_denseflow changes nothing; only the programs call `set_grappler`.
```
grappler.set_grappler('off')   # returns whether grappler will run
```
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ['GRAPPLER', 'set_grappler']

GRAPPLER = ('on', 'off')


def set_grappler(setting: str) -> bool:
  """Turns grappler on or off for the functions this process calls for the first time from now.

  Args:
    setting: 'on' or 'off' (module docstring).

  Returns:
    Whether grappler runs.

  Raises:
    ValueError: `setting` is not one of `GRAPPLER`.
  """
  if setting not in GRAPPLER:
    raise ValueError(f'`grappler` must be one of {GRAPPLER}, got {setting!r}.')
  enabled = setting == 'on'
  tf.config.optimizer.set_experimental_options({'disable_meta_optimizer': not enabled})
  return enabled
