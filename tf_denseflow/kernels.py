"""Which convolution kernels the networks trace: the CPU-tuned ones or the library ops.

Two kernel families compute the same convolutions (equal to float32 rounding):
```
kind                          'cpu'                                   'library'
3x3 'same', stride 1 (nn.Conv) tf.nn.conv2d forward, gradients as two  tf.nn.conv2d and its own
                               matmuls over a tap matrix                gradient kernels (cuDNN)
                               (`nn.conv3x3.conv3x3_same`)
1x1, stride 1 (nn.Conv)        matmul on the `[N*H*W, C]` view          tf.nn.conv2d
InvertibleConv1x1 (bijector)   matmul on the `[N*H*W, C]` view          tf.nn.conv2d
```
The 'cpu' kernels were measured faster on CPUs (docs/benchmarks.md: TF's Conv2DBackpropFilter/
Input reach about half of the CPU's GEMM rate on these shapes). Nothing has been measured on a GPU
yet, so GPUs get the library ops (cuDNN) until `benchmarks/gpu_check.sh`, which times both kinds on
a GPU, says otherwise.

The setting is one of `CONV_KERNELS`:
- 'auto' (default): 'library' when TensorFlow sees a GPU (`tf.config.list_logical_devices('GPU')`),
  else 'cpu'. On a CPU-only machine this is exactly what the code did before the switch existed.
- 'cpu' or 'library': forced (tests compare the two; `--conv_kernels` of `tf_denseflow.bench` and
  of `tf_denseflow.train`).

It is read when a function is *traced* (each `Conv.call` asks `resolve()`), so set it before the
first call of a `tf.function`; a function traced already keeps the kernels it was traced with.
It is process-wide, not thread-local: MirroredStrategy traces each replica in its own thread.
```
kernels.set_conv_kernels('library')          # for the rest of the process
with kernels.conv_kernels('cpu'):            # for a block (tests)
  ...
```
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import tensorflow as tf

__all__ = ['CONV_KERNELS', 'conv_kernels', 'get_conv_kernels', 'resolve', 'set_conv_kernels']

CONV_KERNELS = ('auto', 'cpu', 'library')

_LOCK = threading.Lock()
_SETTING = ['auto']


def _check(kind: str) -> str:
  if kind not in CONV_KERNELS:
    raise ValueError(f'`conv_kernels` must be one of {CONV_KERNELS}, got {kind!r}.')
  return kind


def set_conv_kernels(kind: str) -> None:
  """Sets the kernels that functions traced from now on use.

  Args:
    kind: 'auto', 'cpu' or 'library' (module docstring).

  Raises:
    ValueError: `kind` is not one of `CONV_KERNELS`.
  """
  with _LOCK:
    _SETTING[0] = _check(kind)


def get_conv_kernels() -> str:
  """The current setting, one of `CONV_KERNELS` (possibly 'auto')."""
  return _SETTING[0]


@contextlib.contextmanager
def conv_kernels(kind: str) -> Iterator[None]:
  """Within the block, functions traced use `kind` kernels; the previous setting afterwards.

  Raises:
    ValueError: `kind` is not one of `CONV_KERNELS`.
  """
  with _LOCK:
    previous, _SETTING[0] = _SETTING[0], _check(kind)
  try:
    yield
  finally:
    with _LOCK:
      _SETTING[0] = previous


@functools.cache
def _gpu_visible() -> bool:
  # Logical devices are fixed once TensorFlow has initialised, so one look is enough.
  return bool(tf.config.list_logical_devices('GPU'))


def resolve() -> str:
  """'cpu' or 'library': the kernels to trace now ('auto' resolved by GPU visibility)."""
  kind = _SETTING[0]
  if kind == 'auto':
    return 'library' if _gpu_visible() else 'cpu'
  return kind
