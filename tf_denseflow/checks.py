"""Argument checks shared by the public API and the programs: every error names the argument.

A numeric argument may arrive as a Python number, a NumPy scalar (or 0-D array), an eager 0-D
tensor or a symbolic tensor inside `tf.function`. Concrete values are checked at once and raise
`TypeError` / `ValueError` naming the argument; symbolic tensors get `tf.debugging` assertions
whose message names the argument too (TF raises `InvalidArgumentError` when the graph runs).

The checks return the value to use: a Python `int` / `float` for concrete input (so shapes and
loop bounds stay static), the asserted tensor otherwise.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import tensorflow as tf

__all__ = [
  'FLOAT32_MAX',
  'FLOAT32_TINY',
  'INT32_MAX',
  'INT64_MAX',
  'INT64_MIN',
  'MAX_CPU_DEVICES',
  'MAX_STEPS',
  'check_float',
  'check_images',
  'check_int',
  'check_seed',
  'concrete_value',
]

Number = Union[int, float, np.number, np.ndarray, tf.Tensor]

# Ranges of the numeric settings (configs and flags): the dtypes their values meet in the graphs.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STEPS = 2**31 - 1  # step counts and intervals (a run of 2e9 steps is far beyond any recipe)
MAX_CPU_DEVICES = 1024
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32 (epsilons)


def concrete_value(value):
  """`value` as a Python/NumPy scalar when it is known now, else `None` (symbolic tensor)."""
  if isinstance(value, (tf.Tensor, tf.Variable)):
    if not tf.executing_eagerly() and not hasattr(value, 'numpy'):
      return tf.get_static_value(value)
    try:
      return value.numpy()
    except (AttributeError, NotImplementedError, TypeError, ValueError):
      return tf.get_static_value(value)
  return value


def _scalar(name: str, value):
  """A concrete value as a NumPy 0-D array; refuses bools, non-numbers and non-scalars."""
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f'`{name}` must be a number, got the bool {value!r}.')
  if isinstance(value, (str, bytes)) or value is None:
    raise TypeError(f'`{name}` must be a number, got {value!r}.')
  array = np.asarray(value)
  if array.ndim != 0:
    raise ValueError(f'`{name}` must be a scalar, got shape {list(array.shape)}.')
  if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
    raise TypeError(f'`{name}` must be a number, got {value!r} ({array.dtype}).')
  return array


def _symbolic_scalar(name: str, value) -> tf.Tensor:
  """A symbolic 0-D number tensor (dtype and static rank checked now, values when it runs)."""
  t = tf.convert_to_tensor(value)
  if not (t.dtype.is_integer or t.dtype.is_floating):
    raise TypeError(f'`{name}` must be a number, got a {t.dtype.name} tensor.')
  if t.shape.rank is not None and t.shape.rank != 0:
    raise ValueError(f'`{name}` must be a scalar, got shape {t.shape}.')
  return t


def check_int(name: str, value: Number, minimum: Optional[int] = 1, maximum: Optional[int] = None):
  """Checks an integer-valued count; returns a Python `int`, or the asserted tensor.

  Args:
    name: the argument's name, as the caller wrote it (used in the error message).
    value: Python/NumPy integer (or an integral float such as `16.0`), or a 0-D tensor.
    minimum: smallest allowed value (`None`: unbounded).
    maximum: largest allowed value (`None`: unbounded).

  Raises:
    TypeError: not a number, or a bool.
    ValueError: not a scalar, not integral, non-finite or out of range.
  """
  concrete = concrete_value(value)
  if concrete is None:
    t = _symbolic_scalar(name, value)
    checks = []
    if t.dtype.is_floating:
      checks.append(
        tf.debugging.Assert(tf.equal(t, tf.round(t)), [f'`{name}` must be an integer, got', t])
      )
      t = tf.cast(t, tf.int64)
    if minimum is not None:
      checks.append(
        tf.debugging.Assert(
          t >= tf.cast(minimum, t.dtype), [f'`{name}` must be >= {minimum}, got', t]
        )
      )
    if maximum is not None:
      checks.append(
        tf.debugging.Assert(
          t <= tf.cast(maximum, t.dtype), [f'`{name}` must be <= {maximum}, got', t]
        )
      )
    with tf.control_dependencies(checks):
      return tf.identity(t)
  array = _scalar(name, concrete)
  if np.issubdtype(array.dtype, np.floating):
    if not np.isfinite(array) or float(array) != math.floor(float(array)):
      raise ValueError(f'`{name}` must be an integer, got {array.item()!r}.')
  elif not np.issubdtype(array.dtype, np.integer):
    raise TypeError(f'`{name}` must be an integer, got {array.item()!r}.')
  result = int(array)
  if minimum is not None and result < minimum:
    raise ValueError(f'`{name}` must be >= {minimum}, got {result}.')
  if maximum is not None and result > maximum:
    raise ValueError(f'`{name}` must be <= {maximum}, got {result}.')
  return result


def check_float(
  name: str,
  value: Number,
  minimum: Optional[float] = None,
  exclusive_minimum: bool = False,
  maximum: Optional[float] = None,
):
  """Checks a finite real number; returns a Python `float`, or the asserted tensor.

  Args:
    name: the argument's name (used in the error message).
    value: Python/NumPy number or a 0-D tensor.
    minimum: lower bound (`None`: unbounded); `exclusive_minimum` makes it strict.
    maximum: upper bound, inclusive (`None`: unbounded).

  Raises:
    TypeError: not a number, or a bool.
    ValueError: not a scalar, NaN or infinite, or out of range.
  """
  relation = '>' if exclusive_minimum else '>='
  concrete = concrete_value(value)
  if concrete is None:
    t = _symbolic_scalar(name, value)
    t = tf.cast(t, tf.float32) if t.dtype.is_integer else t
    checks = [tf.debugging.Assert(tf.math.is_finite(t), [f'`{name}` must be finite, got', t])]
    if minimum is not None:
      ok = t > minimum if exclusive_minimum else t >= minimum
      checks.append(tf.debugging.Assert(ok, [f'`{name}` must be {relation} {minimum}, got', t]))
    if maximum is not None:
      checks.append(tf.debugging.Assert(t <= maximum, [f'`{name}` must be <= {maximum}, got', t]))
    with tf.control_dependencies(checks):
      return tf.identity(t)
  array = _scalar(name, concrete)
  result = float(array)
  if not math.isfinite(result):
    raise ValueError(f'`{name}` must be finite, got {result!r}.')
  if minimum is not None and (result <= minimum if exclusive_minimum else result < minimum):
    raise ValueError(f'`{name}` must be {relation} {minimum}, got {result!r}.')
  if maximum is not None and result > maximum:
    raise ValueError(f'`{name}` must be <= {maximum}, got {result!r}.')
  return result


_IMAGE_DTYPES = (
  tf.uint8,
  tf.uint16,
  tf.int8,
  tf.int16,
  tf.int32,
  tf.int64,
  tf.float16,
  tf.bfloat16,
  tf.float32,
  tf.float64,
)


def check_images(images, image_shape, name: str = 'images') -> tf.Tensor:
  """Checks a batch of 8-bit images; returns them as float32 levels `[B, H, W, C]` in 0..255.

  An image is integer levels `0..255` (the uint8 scale, whatever `num_bits` the model uses):
  uint8 always passes; other integer and float dtypes pass when every value is an integer in
  `[0, 256)`. Floats in `[0, 1]`, values such as 300 or -5, fractions and NaN are refused: in
  eager mode at once, inside `tf.function` by an assertion that runs before the values are used
  (`InvalidArgumentError` with the same message).

  Args:
    images: `[B, H, W, C]` array-like.
    image_shape: the model's `(H, W, C)`.
    name: the argument's name for the messages.

  Raises:
    TypeError: a bool, complex or string dtype, or not convertible to a tensor.
    ValueError: a wrong rank or event shape, or values that are not integer levels 0..255.
  """
  try:
    images = tf.convert_to_tensor(images)
  except (TypeError, ValueError) as e:
    raise TypeError(f'`{name}` must be a [batch, H, W, C] array of pixel levels: {e}') from None
  if images.dtype not in _IMAGE_DTYPES:
    raise TypeError(
      f'`{name}` must be uint8 (or integer levels 0..255 in an integer or float dtype), '
      f'got dtype {images.dtype.name}.'
    )
  if images.shape.rank is not None and (
    images.shape.rank != 4 or not images.shape[1:].is_compatible_with(image_shape)
  ):
    raise ValueError(
      f'`{name}` must have shape [batch, {", ".join(map(str, image_shape))}], got {images.shape}.'
    )
  if images.dtype == tf.uint8:
    return tf.cast(images, tf.float32)
  message = f'`{name}` must hold integer pixel levels in [0, 255] (uint8 scale)'
  if hasattr(images, 'numpy'):  # eager: check now, naming the first bad value
    values = images.numpy()
    if np.issubdtype(values.dtype, np.floating) or values.dtype == tf.bfloat16.as_numpy_dtype:
      values = values.astype(np.float64)
      bad = ~np.isfinite(values) | (values != np.floor(values)) | (values < 0) | (values > 255)
    else:
      bad = (values < 0) | (values > 255)
    if np.any(bad):
      index = tuple(int(i) for i in np.argwhere(bad)[0])
      finite = values[np.isfinite(values)] if values.dtype.kind == 'f' else values
      span = f'; values span [{finite.min()}, {finite.max()}]' if finite.size else ''
      raise ValueError(
        f'{message}, got {values[index]!r} at index {list(index)}{span}'
        f' ({int(np.count_nonzero(bad))} bad values). Floats in [0, 1] must be scaled by 255.'
      )
    return tf.cast(images, tf.float32)
  wide = tf.cast(images, tf.float64) if images.dtype.is_floating else tf.cast(images, tf.int64)
  ok = (wide >= 0) & (wide <= 255)
  if images.dtype.is_floating:
    ok &= tf.math.is_finite(wide) & tf.equal(wide, tf.floor(wide))
  check = tf.debugging.Assert(
    tf.reduce_all(ok),
    [f'{message}; got values in [min, max] =', tf.reduce_min(wide), tf.reduce_max(wide)],
  )
  with tf.control_dependencies([check]):
    return tf.cast(images, tf.float32)


def check_seed(seed, name: str = 'seed') -> tf.Tensor:
  """A stateless seed: two integers (`[2]`, any integer dtype) -> int64 tensor `[2]`.

  Raises:
    TypeError: a float, bool or string seed.
    ValueError: a shape other than `[2]`.
  """
  if isinstance(seed, (bool, np.bool_)):
    raise TypeError(f'`{name}` must be two integers, got {seed!r}.')
  try:
    t = tf.convert_to_tensor(seed)
  except (TypeError, ValueError) as e:
    raise TypeError(f'`{name}` must be two integers: {e}') from None
  if not t.dtype.is_integer:
    raise TypeError(f'`{name}` must be two integers, got dtype {t.dtype.name}.')
  if t.shape.rank is not None and t.shape.as_list() not in ([2], [None]):
    raise ValueError(f'`{name}` must have shape [2], got {t.shape}.')
  return tf.cast(t, tf.int64)
