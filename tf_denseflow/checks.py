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
import numbers
from typing import Optional, Union

import numpy as np
import tensorflow as tf

__all__ = ['check_float', 'check_int', 'concrete_value']

Number = Union[int, float, np.number, np.ndarray, tf.Tensor]


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
    t = tf.convert_to_tensor(value)
    if not (t.dtype.is_integer or t.dtype.is_floating):
      raise TypeError(f'`{name}` must be a number, got a {t.dtype.name} tensor.')
    if t.shape.rank is not None and t.shape.rank != 0:
      raise ValueError(f'`{name}` must be a scalar, got shape {t.shape}.')
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
    t = tf.convert_to_tensor(value)
    if not (t.dtype.is_integer or t.dtype.is_floating):
      raise TypeError(f'`{name}` must be a number, got a {t.dtype.name} tensor.')
    if t.shape.rank is not None and t.shape.rank != 0:
      raise ValueError(f'`{name}` must be a scalar, got shape {t.shape}.')
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


def is_number(value) -> bool:
  """Whether `value` is a Python or NumPy real number (not a bool)."""
  return isinstance(value, (numbers.Real, np.number)) and not isinstance(value, (bool, np.bool_))
