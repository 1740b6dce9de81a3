"""Marks the functions traced for XLA, so the few ops XLA cannot compile take another path.

XLA has no kernel for some ops (`tf.linalg.slogdet`); code that has an XLA-safe equivalent asks
`compatible_now()` while it is traced. The compiling code says so explicitly, instead of the
library sniffing TensorFlow's private graph state:
```
fn = xla.jit(fn)               # tf.function(jit_compile=True) tracing fn under xla.compatible()
with xla.compatible():         # or around any code traced for XLA
  ...
```
The flag is thread-local: MirroredStrategy traces each replica's function in its own thread, and
`jit` enters it inside the traced function, so every replica's trace sees it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator

import tensorflow as tf

__all__ = ['compatible', 'compatible_now', 'jit']

_STATE = threading.local()


@contextlib.contextmanager
def compatible() -> Iterator[None]:
  """Within the block, `compatible_now()` is True (code traced here must compile with XLA)."""
  depth = getattr(_STATE, 'depth', 0)
  _STATE.depth = depth + 1
  try:
    yield
  finally:
    _STATE.depth = depth


def compatible_now() -> bool:
  """True inside `compatible()` (in this thread): take the XLA-compilable path."""
  return getattr(_STATE, 'depth', 0) > 0


def jit(fn: Callable) -> Callable:
  """`tf.function(fn, jit_compile=True, autograph=False)`, traced under `compatible()`."""

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with compatible():
      return fn(*args, **kwargs)

  return tf.function(traced, jit_compile=True, autograph=False)
