"""Whether TensorFlow's graph optimizer (grappler) runs on the functions a program instantiates.

Grappler rewrites every function graph when it is first called (pruning, constant folding,
arithmetic rewrites, op fusions), once per function. The programs (`train`, `evaluate`,
`sample`, `bench`) take `--grappler`, one of `GRAPPLER`:
- 'auto' (default): off for the training step's own graph where it buys nothing, on for the
  network functions the step calls and for everything else. Measured on CPUs with the 'cpu'
  convolution kernels (docs/benchmarks.md section 5.4): grappler on the step's own graph (the
  bijector math, the update, ~8,500 nodes at `small`) buys no step time and costs a large part
  of the first call (DenseFlow-74-10: ~57 s against ~96 s), while on the shared network
  functions its pruning and fusions keep the peak lower (below `on`'s at `small`, within 1% at
  DenseFlow-74-10); evaluation and sampling graphs without it take 30-200 MB more. The step's
  own graph keeps grappler on a GPU (cuDNN kernels, where the layout optimizer and fusions are
  expected to matter), with `--conv_kernels=library` and under `--jit_compile`
  (`training_step_grappler`).
- 'on': TensorFlow's default, for every function.
- 'off': `disable_meta_optimizer`, for every function (the quickest start, more memory).

Process-wide (`tf.config.optimizer.set_experimental_options`). TensorFlow instantiates a
function once per configuration and keeps each instance. A function called from Python takes
the option in force when it is *called*; a function called from inside another one without
being inlined (the shared network functions, `_noinline`) takes the option that was in force
when its caller was *traced* (the call op records it). `calls_with(step, enabled, networks)`
traces under `networks` and calls under `enabled`. Importing tf_denseflow changes nothing;
only the programs call `set_grappler` and wrap their training step.
```
grappler.set_grappler('auto')                       # every function: TF's default
step_graph, networks = grappler.training_step_grappler('auto')      # (False, True) on a CPU
train_step = grappler.calls_with(train_step, step_graph, networks)
```
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Tuple

import tensorflow as tf

from tf_denseflow import kernels

__all__ = [
  'GRAPPLER',
  'calls_with',
  'optimizing',
  'process_enabled',
  'set_grappler',
  'training_step_grappler',
]

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


def training_step_grappler(setting: str, jit_compile: bool = False) -> Tuple[bool, bool]:
  """Whether grappler runs on the training step's own graph and on the networks it calls.

  'on' and 'off': both. 'auto': the step's own graph without it where the networks use the
  CPU convolution kernels, no GPU is visible and no XLA; the networks (the shared network
  functions the step calls) with it.

  Returns:
    `(step, networks)`, the `enabled` and `networks` arguments of `calls_with`.

  Raises:
    ValueError: `setting` is not one of `GRAPPLER`.
  """
  if _check(setting) != 'auto':
    return (setting == 'on',) * 2
  # kernels.resolve() is read now: set the kernels first.
  gpu = bool(tf.config.list_logical_devices('GPU'))
  step = bool(jit_compile) or gpu or kernels.resolve() != 'cpu'
  return step, True  # the networks keep it (docs/benchmarks.md section 5.4)


def process_enabled() -> bool:
  """Whether functions called now (outside `optimizing`) run through grappler."""
  return not tf.config.optimizer.get_experimental_options().get(_OPTION, False)


@contextlib.contextmanager
def optimizing(enabled: bool) -> Iterator[None]:
  """Within the block, functions are called (and instantiated) with grappler on or off.

  The previous setting afterwards. Thread-safety: the option is process-wide; call the
  functions of other settings from the same thread (the programs do).
  """
  previous = process_enabled()
  if previous == enabled:
    yield
    return
  tf.config.optimizer.set_experimental_options({_OPTION: not enabled})
  try:
    yield
  finally:
    tf.config.optimizer.set_experimental_options({_OPTION: not previous})


def calls_with(fn: Callable, enabled: bool | None, networks: bool | None = None) -> Callable:
  """`fn` (a `tf.function`) traced under `optimizing(networks)`, called under `optimizing(enabled)`.

  Why two settings: a function that `fn` calls without inlining it (the shared network
  functions, `nn.shared_function`) is instantiated with the setting that was in force when `fn`
  was *traced* (its call op records it), `fn`'s own graph with the one in force when `fn` is
  *called*. The first call traces `fn` (`get_concrete_function` under `networks`), then calls
  it; later calls only call it (a later call whose inputs need a new trace traces it under
  `enabled`: the training step has one input signature).

  Args:
    fn: a `tf.function`.
    enabled: grappler for `fn`'s own graph; None: `fn` itself is returned.
    networks: grappler for the non-inlined functions `fn` calls (default: `enabled`).

  Returns:
    A callable with `fn`'s other attributes (`python_function`, ...), `grappler` (`enabled`)
    and `networks_grappler`.
  """
  if enabled is None:
    return fn
  return _CalledWith(fn, bool(enabled), bool(enabled if networks is None else networks))


class _CalledWith:
  def __init__(self, fn: Callable, enabled: bool, networks: bool):
    self._fn = fn
    self.grappler = enabled
    self.networks_grappler = networks
    self._traced = False

  def get_concrete_function(self, *args: Any, **kwargs: Any) -> Any:
    with optimizing(self.networks_grappler):
      return self._fn.get_concrete_function(*args, **kwargs)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    if not self._traced and hasattr(self._fn, 'get_concrete_function'):  # a tf.function
      self.get_concrete_function(*args, **kwargs)
      self._traced = True
    with optimizing(self.grappler):
      return self._fn(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._fn, name)
