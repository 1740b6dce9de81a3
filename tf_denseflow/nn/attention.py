"""Nystrom self-attention exactly as in the official DenseFlow coupling network.

Xiong et al. Nystromformer: a Nystrom-based algorithm for approximating self-attention. AAAI 2021.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import tensorflow as tf

from tf_denseflow.nn.layers import Conv, Layer, Seeds

__all__ = [
  'NystromAttention',
  'batch_matmul',
  'iterative_pinv',
  'nystrom_attention',
  'softmax_over_rows',
]


def batch_matmul(a: tf.Tensor, b: tf.Tensor, transpose_b: bool = False) -> tf.Tensor:
  """`a @ b` (or `a @ b^T`) for `[N, i, j]` and `[N, j, k]` (`[N, k, j]`) with equal batch `N`.

  Written as an einsum with one explicit batch label, not `tf.matmul`: `tf.GradientTape.jacobian`
  and `tf.vectorized_map` (pfor) turn a `BatchMatMulV2` of a per-iteration and a shared operand
  into a *broadcasting* batch matmul (`[P, N, i, j] @ [N, j, k]`), and with oneDNN on, TF 2.21's
  broadcasting batch matmul corrupts the heap and returns wrong numbers on Intel Xeon CPUs with
  AMX (BUILD.md, "Known TF bugs"). pfor rewrites an einsum by adding a free label instead
  (`pnij,njk->pnik`), which the einsum kernel runs as a matmul over equal batches. Same values
  as `tf.matmul` (tests/nn_test.py).
  """
  if a.shape.rank != 3 or b.shape.rank != 3:
    raise ValueError(f'batch_matmul takes rank-3 operands, got {a.shape} and {b.shape}.')
  return tf.einsum('nij,nkj->nik' if transpose_b else 'nij,njk->nik', a, b)


def _full_constant(value: np.ndarray, like: tf.Tensor) -> tf.Tensor:
  """`value` (broadcastable to `like`) as a constant of `like`'s whole static shape if known.

  The same values in an elementwise op with `like` as the smaller constant, and a smaller
  gradient graph: TF's gradients of `Sub` and `Mul` take their equal-shapes path (`-dy`;
  `dy * y, dy * x`) instead of reducing `dy` to the constant's shape (Shape, Sum, Reshape) for
  a gradient nobody reads: ~5 graph ops fewer per use, ~100 per attention's backward pass.
  """
  shape = like.shape
  if shape.is_fully_defined():
    value = np.broadcast_to(value, shape.as_list())
  return tf.constant(np.array(value, dtype=like.dtype.as_numpy_dtype))  # a copy; 0-d stays 0-d


def iterative_pinv(k: tf.Tensor, num_iterations: int = 6) -> tf.Tensor:
  """Moore-Penrose pseudo-inverse of each `[m, m]` matrix by the Nystromformer iteration.

  ```
  V0 = K^T / (max_col_sum(|K|) * max_row_sum(|K|))        # per matrix
  V <- 0.25 * V @ (13 I - KV @ (15 I - KV @ (7 I - KV))),   KV = K @ V
  ```
  """
  abs_k = tf.abs(k)
  col = tf.reduce_max(tf.reduce_sum(abs_k, axis=-2), axis=-1)
  row = tf.reduce_max(tf.reduce_sum(abs_k, axis=-1), axis=-1)
  v = tf.linalg.matrix_transpose(k) / (col * row)[..., None, None]
  # c * I and 0.25 as constants (the same float32 values as `c * tf.eye` and the scalar, without
  # a Mul per use, and of the operands' shape: the traced graphs, their gradients included, are
  # what a first call costs).
  eye = np.eye(k.shape[-1])
  eye_7, eye_13, eye_15 = (_full_constant(c * eye, k) for c in (7.0, 13.0, 15.0))
  quarter = _full_constant(np.float64(0.25), k)
  for _ in range(num_iterations):
    kv = batch_matmul(k, v)
    v = quarter * batch_matmul(v, eye_13 - batch_matmul(kv, eye_15 - batch_matmul(kv, eye_7 - kv)))
  return v


def softmax_over_rows(x: tf.Tensor) -> tf.Tensor:
  """`tf.nn.softmax(x, axis=-2)` of a rank-3 `x`, the same kernels and values.

  TF computes a softmax over a non-last axis by swapping it with the last one, with the
  permutation built by ops at run time (`Range`, `Pack`, `ConcatV2`, ...: ~10 ops per softmax,
  and more in its gradient); the static permutation here is two `Transpose`s.
  """
  return tf.transpose(tf.nn.softmax(tf.transpose(x, [0, 2, 1])), [0, 2, 1])


def nystrom_attention(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, num_landmarks: int) -> tf.Tensor:
  """DenseFlow's single-head Nystrom attention on `[N, L, E]` tokens; returns `[N, L, E]`.

  ```
  Qm, Km = segment means of Q, K over L/m contiguous tokens, divided by sqrt(L)
  A1 = softmax(Q Km^T, axis=-2);  A2 = softmax(Qm Km^T, axis=-2);  A3 = softmax(Qm K^T, axis=-2)
  out = (A1 pinv(A2)) (A3 V) + V
  ```
  The softmaxes normalise over axis -2 and Q, K are not scaled by the head dimension: both are
  the official code's choices (they differ from Nystromformer).
  """
  length, embed = q.shape[-2], q.shape[-1]
  m = num_landmarks
  qm = tf.reduce_mean(tf.reshape(q, [-1, m, length // m, embed]), axis=2)
  km = tf.reduce_mean(tf.reshape(k, [-1, m, length // m, embed]), axis=2)
  scale = _full_constant(np.float64(1.0 / math.sqrt(length)), qm)  # qm, km: [N, m, E]
  qm, km = qm * scale, km * scale
  a1 = softmax_over_rows(batch_matmul(q, km, transpose_b=True))
  a2 = softmax_over_rows(batch_matmul(qm, km, transpose_b=True))
  a3 = softmax_over_rows(batch_matmul(qm, k, transpose_b=True))
  return batch_matmul(batch_matmul(a1, iterative_pinv(a2)), batch_matmul(a3, v)) + v


class NystromAttention(Layer):
  """1x1 qkv projection, Nystrom attention, 1x1 output projection (`channels -> channels`).

  `tokens='official'` reproduces the official raw reshape of the NCHW qkv buffer into
  `[N, H*W, 3E]` (token t, feature j reads channel `(t*3E + j) // (H*W)`); `tokens='pixel'` uses
  one token per pixel. The attention itself runs in float32.
  """

  def __init__(
    self,
    channels: int,
    num_landmarks: int = 4,
    tokens: str = 'official',
    compute_dtype: str = 'float32',
    seeds: Optional[Seeds] = None,
    name: Optional[str] = None,
  ):
    super().__init__(name=name)
    self.embed = channels // 2
    self.num_landmarks = num_landmarks
    self.tokens = tokens
    self.qkv = Conv(channels, 3 * self.embed, 1, compute_dtype=compute_dtype, seeds=seeds)
    self.out = Conv(self.embed, channels, 1, compute_dtype=compute_dtype, seeds=seeds)
    self.built = True

  def call(self, x):
    height, width = x.shape[1], x.shape[2]
    length, e = height * width, self.embed
    qkv = tf.cast(self.qkv(x), tf.float32)  # [N, H, W, 3E]
    if self.tokens == 'official':
      tokens = tf.reshape(tf.transpose(qkv, [0, 3, 1, 2]), [-1, length, 3 * e])
    else:
      tokens = tf.reshape(qkv, [-1, length, 3 * e])
    q, k, v = tf.split(tokens, 3, axis=-1)
    o = nystrom_attention(q, k, v, self.num_landmarks)  # [N, L, E]
    if self.tokens == 'official':
      o = tf.transpose(tf.reshape(o, [-1, e, height, width]), [0, 2, 3, 1])
    else:
      o = tf.reshape(o, [-1, height, width, e])
    return self.out(o)
