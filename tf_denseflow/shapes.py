"""Shapes as Python lists where they are static, so traced graphs hold one constant for them.

`tf.shape(x)` of a tensor whose shape is known is folded into a `Const` when traced, but
slicing it (`tf.shape(x)[:-3]`: a `StridedSlice` and its three constant inputs) and joining the
pieces (`tf.concat`: a `ConcatV2`, its axis and the other pieces) are graph ops, in every
traced function and again in the gradient's. With the shape read statically they are one
constant: ~7 ops fewer for each reshape of a 1x1 convolution's output, a coupling's
parameters or a squeeze (`small`'s training graph: docs/benchmarks.md section 5.5). Where a
dimension is unknown (a batch of `None`: TFP pipelines, serving signatures), `tf.shape`.
"""

from __future__ import annotations

from typing import Any, List, Union

import tensorflow as tf

__all__ = ['cast', 'concat_shape', 'num_elements', 'shape_of']

Shape = Union[List[int], tf.Tensor]


def shape_of(x: Any) -> Shape:
  """`x`'s shape: a list of ints when fully static, else `tf.shape(x)` (int32 `[rank]`).

  Either slices (`shape_of(x)[:-3]`) and feeds `tf.reshape`, `tf.zeros`, `tf.ones` alike.
  `x`: a tensor, or anything `tf.convert_to_tensor` takes (a NumPy array, a nested list).
  """
  shape = tf.TensorShape(x.shape) if hasattr(x, 'shape') else tf.convert_to_tensor(x).shape
  if shape.is_fully_defined():
    return shape.as_list()
  return tf.shape(x)


def concat_shape(*parts: Shape) -> Shape:
  """The concatenation of shape pieces (lists of ints or int32 vectors): a list when all are."""
  if all(isinstance(p, (list, tuple)) for p in parts):
    return [d for p in parts for d in p]
  return tf.concat([tf.cast(p, tf.int32) if tf.is_tensor(p) else p for p in parts], 0)


def num_elements(shape: Shape) -> Union[int, tf.Tensor]:
  """The product of a shape's entries (an int for a list, an int32 scalar for a tensor)."""
  if isinstance(shape, (list, tuple)):
    n = 1
    for d in shape:
      n *= d
    return n
  return tf.reduce_prod(shape)


def cast(value: Union[int, tf.Tensor], dtype: tf.DType) -> tf.Tensor:
  """`tf.cast(value, dtype)`; a Python number becomes one constant (not a constant and a Cast)."""
  if tf.is_tensor(value):
    return tf.cast(value, dtype)
  return tf.constant(value, dtype)
