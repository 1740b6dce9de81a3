"""The 3x3 'same' convolution of the dense layers, with a gradient that is faster on CPU.

`Conv` (`nn.layers`) uses it with the 'cpu' kernels (`tf_denseflow.kernels`).
"""

from __future__ import annotations

import functools
from typing import Tuple

import numpy as np
import tensorflow as tf

from tf_denseflow import shapes
from tf_denseflow.nn import gradient_rules

__all__ = ['conv3x3_same']


@functools.cache
def _tap_rows(height: int, width: int) -> np.ndarray:
  """`[H*W*9]` int32: for pixel `q` and tap `(i, j)`, the row of `dy` shifted by `(1-i, 1-j)`.

  Rows index one image's `dy` flattened to `[H*W + 1, C]`; row `H*W` is the appended zero row
  that stands for the zero padding.
  """
  y, x, i, j = np.meshgrid(
    np.arange(height), np.arange(width), np.arange(3), np.arange(3), indexing='ij'
  )
  src_y, src_x = y + 1 - i, x + 1 - j
  inside = (src_y >= 0) & (src_y < height) & (src_x >= 0) & (src_x < width)
  return np.where(inside, src_y * width + src_x, height * width).astype(np.int32).reshape(-1)


def _shifted_taps(dy: tf.Tensor) -> tf.Tensor:
  """`[N*H*W, 9*C]`: column block `3i+j` holds `dy` shifted by `(1-i, 1-j)` (zero filled).

  One gather per image from `dy` with a zero row appended: a single pass over the output
  (1.2-2.4x faster than padding, slicing out the 9 shifted windows and concatenating them, at
  16x16 and 32x32 with batch 16; docs/benchmarks.md).
  """
  height, width, channels = dy.shape[1], dy.shape[2], dy.shape[3]
  rows = tf.pad(tf.reshape(dy, [-1, height * width, channels]), [[0, 0], [0, 1], [0, 0]])
  taps = tf.gather(rows, _tap_rows(height, width), axis=1)  # [N, H*W*9, C]
  return tf.reshape(taps, [-1, 9 * channels])


def _conv3x3_forward(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
  return tf.nn.conv2d(x, kernel, 1, 'SAME')


def _conv3x3_backward(inputs: Tuple[tf.Tensor, tf.Tensor], dy: tf.Tensor):
  x, kernel = inputs
  c_in, c_out = kernel.shape[2], kernel.shape[3]
  taps = _shifted_taps(dy)
  # x^T T is [C_in, 9*C_out]; moving whole rows of C_out into [9, C_in, C_out] is a cheaper
  # transpose than swapping the last two axes of a [9*C_out, C_in] product.
  d_kernel = tf.matmul(tf.reshape(x, [-1, c_in]), taps, transpose_a=True)
  d_kernel = tf.reshape(
    tf.transpose(tf.reshape(d_kernel, [c_in, 9, c_out]), [1, 0, 2]), kernel.shape
  )
  flipped = tf.reshape(tf.transpose(kernel, [0, 1, 3, 2]), [9 * c_out, c_in])
  dx = tf.reshape(tf.matmul(taps, flipped), shapes.shape_of(x))
  return dx, d_kernel


_CONV3X3 = gradient_rules.GradientRule('Conv3x3Same', _conv3x3_forward, _conv3x3_backward)


def conv3x3_same(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
  """`tf.nn.conv2d(x, kernel, 1, 'SAME')` for a 3x3 kernel, with a faster gradient on CPU.

  Forward is the library convolution. With `y[q] = sum_{i,j} x[q + (i-1, j-1)] W[i, j]`, both
  gradients are one matmul each over the same tap matrix `T` (`[N*H*W, 9*C_out]`, the upstream
  gradient `dy` shifted by each tap, `T[q, (i, j, o)] = dy[q - (i-1, j-1), o]`):
  ```
  dW[i, j, c, o] = sum_q x[q, c] T[q, (i, j, o)]          (dW = x^T T)
  dx[q, c]       = sum_{i,j,o} T[q, (i, j, o)] W[i, j, c, o]  (dx = T W^T)
  ```
  The tap matrix has only `9 * C_out` columns (the dense layers' 3x3 convs map many channels to
  a few), and the two matmuls run near the CPU's GEMM peak; TF's Conv2DBackpropFilter/Input
  kernels reach about half of it on these shapes (docs/benchmarks.md). H and W must be static.
  The gradient is a `nn.gradient_rules.GradientRule` (no traced graph kept alive).
  """
  return _CONV3X3(x, kernel)
