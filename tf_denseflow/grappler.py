"""Whether TensorFlow's graph optimizer (grappler) runs on the functions a program instantiates.

Grappler rewrites every function graph when it is first called (pruning, constant folding,
arithmetic rewrites, op fusions), once per function. The programs (`train`, `evaluate`,
`sample`, `bench`) take `--grappler`, one of `GRAPPLER`:
- 'auto' (default): off for the training step where it buys nothing, on for everything else.
  Measured on CPUs with the 'cpu' convolution kernels (docs/benchmarks.md sections 5.3, 5.4):
  without grappler the training step runs as fast, its first call (grappler's passes over the
  ~20k-node step) is a quarter to a third shorter at `small` and far shorter at
  DenseFlow-74-10, for 30-65 MB more peak memory at `small`; evaluation and sampling graphs
  run unpruned and unfused without it and take 30-200 MB more, so they keep it. So the training step goes without grappler when the networks use the 'cpu' kernels and
  no XLA (`training_step_grappler`); on a GPU (cuDNN kernels, where the layout optimizer and
  fusions are expected to matter) or under `--jit_compile` it keeps TensorFlow's default.
- 'on': TensorFlow's default, for every function.
- 'off': `disable_meta_optimizer`, for every function (the quickest start, more memory).

Process-wide (`tf.config.optimizer.set_experimental_options`) and read when a function is
*called*: TensorFlow instantiates a function once per configuration it is called with and keeps
each, so the training step called under `optimizing(False)` every time is instantiated without
grappler once, and the functions called outside it with grappler once. Importing tf_denseflow
changes nothing; only the programs call `set_grappler` and wrap their training step.
```
grappler.set_grappler('auto')                       # every function: TF's default
train_step = grappler.calls_with(train_step, grappler.training_step_grappler('auto'))
```
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import tensorflow as tf

from tf_denseflow import kernels

__all__ = ['GRAPPLER', 'calls_with', 'optimizing', 'set_grappler', 'training_step_grappler']

GRAPPLER = ('auto', 'on', 'off')

_OPTION = 'disable_meta_optimizer'


def _check(setting: str) -> str:
  if setting not in GRAPPLER:
    raise ValueError(f'`grappler` must be one of {GRAPPLER}, got {setting!r}.')
  return setting


def set_grappler(setting: str) -> bool:
  """Sets grappler for the functions this process calls for the first time from now.

  Args:
    setting: 'auto', 'on' or 'off' (module docstring); 'auto' is 'on' here (the training step
      is wrapped with `calls_with` to go without).

  Returns:
    Whether grappler runs on functions called outside `optimizing`.

  Raises:
    ValueError: `setting` is not one of `GRAPPLER`.
  """
  enabled = _check(setting) != 'off'
  tf.config.optimizer.set_experimental_options({_OPTION: not enabled})
  return enabled


def training_step_grappler(setting: str, jit_compile: bool = False) -> bool:
  """Whether the training step runs through grappler under `setting`.

  'auto': only where the networks use the library convolution kernels (a GPU) or XLA
  (`kernels.resolve()` is read now: set the kernels first).

  Raises:
    ValueError: `setting` is not one of `GRAPPLER`.
  """
  if _check(setting) != 'auto':
    return setting == 'on'
  return bool(jit_compile) or kernels.resolve() != 'cpu'


@contextlib.contextmanager
def optimizing(enabled: bool) -> Iterator[None]:
  """Within the block, functions are called (and instantiated) with grappler on or off.

  The previous setting afterwards. Thread-safety: the option is process-wide; call the
  functions of other settings from the same thread (the programs do).
  """
  options = tf.config.optimizer.get_experimental_options()
  previous = bool(options.get(_OPTION, False))
  if previous == (not enabled):
    yield
    return
  tf.config.optimizer.set_experimental_options({_OPTION: not enabled})
  try:
    yield
  finally:
    tf.config.optimizer.set_experimental_options({_OPTION: previous})


def calls_with(fn: Callable, enabled: bool | None) -> Callable:
  """`fn` (a `tf.function`) called under `optimizing(enabled)`; `fn` itself for None.

  The wrapper has `fn`'s other attributes (`python_function`, `get_concrete_function`, ...) and
  `grappler` (`enabled`).
  """
  return fn if enabled is None else _CalledWith(fn, bool(enabled))


class _CalledWith:
  def __init__(self, fn: Callable, enabled: bool):
    self._fn = fn
    self.grappler = enabled

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    with optimizing(self.grappler):
      return self._fn(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._fn, name)
