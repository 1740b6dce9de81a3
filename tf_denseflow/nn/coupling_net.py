"""The conditioner networks of DenseFlow: coupling network, cross-unit network g_i, and the
variational dequantization's context and coupling networks.

Every coupling and cross-unit network ends in a zero-initialised conv, so every coupling starts as
the identity and every cross-unit coupling starts as `eta = noise ~ N(0, I)` (the context network
does not, but it feeds only zero-initialised dequantization couplings).
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tf_denseflow.nn.attention import NystromAttention
from tf_denseflow.nn.dense_net import DenseConvBlock
from tf_denseflow.nn.layers import BatchNorm, Conv, Layer, Seeds
from tf_denseflow.nn.shared_function import SharedNetwork

__all__ = ['CouplingNetwork', 'CrossUnitNetwork', 'ContextNetwork', 'DequantCouplingNetwork']


class CouplingNetwork(SharedNetwork):
  """DenseFlow's coupling network (the official `DenseNetMultihead`).

  ```
  h   = conv1x1(x)                                       # in -> mid
  a   = NystromAttention(h);  d = DenseConvBlock(h)      # mid each
  h   = conv1x1_nobias(relu(BatchNorm(concat[a, d])))    # 2*mid -> mid
  out = conv1x1_zero_init(h)                             # mid -> out (interleaved params)
  ```
  In a traced graph, networks of the same structure share one function (`SharedNetwork`).
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    mid_channels: int,
    depth: int,
    growth: int,
    use_attention: bool = True,
    num_landmarks: int = 4,
    tokens: str = 'official',
    compute_dtype: str = 'float32',
    seeds: Optional[Seeds] = None,
    name: Optional[str] = None,
  ):
    super().__init__(name=name)
    cd = compute_dtype
    self.structure = (
      in_channels,
      out_channels,
      mid_channels,
      depth,
      growth,
      use_attention,
      num_landmarks,
      tokens,
      compute_dtype,
    )
    self.project = Conv(in_channels, mid_channels, 1, compute_dtype=cd, seeds=seeds)
    self.attention = None
    if use_attention:
      self.attention = NystromAttention(mid_channels, num_landmarks, tokens, cd, seeds)
    self.dense = DenseConvBlock(mid_channels, mid_channels, depth, growth, False, cd, seeds)
    branches = 2 if use_attention else 1
    self.norm = BatchNorm(branches * mid_channels)
    self.mix = Conv(
      branches * mid_channels, mid_channels, 1, use_bias=False, compute_dtype=cd, seeds=seeds
    )
    self.out = Conv(mid_channels, out_channels, 1, zero_init=True, compute_dtype=cd, seeds=seeds)
    self.built = True

  def body(self, x, training=False):
    h = self.project(x)
    branches = [self.dense(h)]
    if self.attention is not None:
      branches.insert(0, tf.cast(self.attention(h), branches[0].dtype))
    h = self.mix(tf.nn.relu(self.norm(tf.concat(branches, axis=-1), training=training)))
    return tf.cast(self.out(h), tf.float32)


class CrossUnitNetwork(SharedNetwork):
  """The cross-unit network g_i: `conv3x3 (4x width) -> ReLU -> conv1x1 (zero init)`.

  Returns `[..., 2 * growth]`: the first half is mu, the second the unconstrained log-sigma.
  (The official class is called `_BNReLUConv` but has no batch norm.)
  """

  uses_training = False

  def __init__(self, in_channels, growth, compute_dtype='float32', seeds=None, name=None):
    super().__init__(name=name)
    self.structure = (in_channels, growth, compute_dtype)
    self.hidden = Conv(
      in_channels, 4 * in_channels, 3, compute_dtype=compute_dtype, seeds=seeds, activation='relu'
    )
    self.out = Conv(
      4 * in_channels, 2 * growth, 1, zero_init=True, compute_dtype=compute_dtype, seeds=seeds
    )
    self.built = True

  def body(self, x, training=False):
    del training
    return tf.cast(self.out(self.hidden(x)), tf.float32)


class ContextNetwork(Layer):
  """Context of the variational dequantization, from the image levels (at half resolution).

  ```
  x -> 2 x / (2**b - 1) - 1 -> DenseConvBlock(3 -> ctx) -> conv2x2 stride 2 -> DenseConvBlock
  ```
  `x` are the model's integer levels `0..2**b - 1` (`b = num_bits`; the official code: b = 8).
  """

  def __init__(
    self,
    in_channels,
    channels,
    depth,
    growth,
    seeds=None,
    name=None,
    num_bits=8,
    compute_dtype='float32',
  ):
    super().__init__(name=name)
    cd = compute_dtype
    self.max_level = float(2**num_bits - 1)
    self.dense_in = DenseConvBlock(
      in_channels, channels, depth, growth, compute_dtype=cd, seeds=seeds
    )
    self.down = Conv(
      channels, channels, 2, strides=2, padding='valid', compute_dtype=cd, seeds=seeds
    )
    self.dense_out = DenseConvBlock(
      channels, channels, depth, growth, compute_dtype=cd, seeds=seeds
    )
    self.built = True

  def call(self, images):
    x = 2.0 * tf.cast(images, tf.float32) / self.max_level - 1.0
    return tf.cast(self.dense_out(self.down(self.dense_in(x))), tf.float32)


class DequantCouplingNetwork(SharedNetwork):
  """Conditioner of the dequantization couplings: `conv1x1 -> x + DenseConvBlock(x) -> conv1x1`.

  The input is `concat[x1, context]`; the last conv is zero-initialised.
  """

  uses_training = False

  def __init__(
    self,
    in_channels,
    out_channels,
    mid_channels,
    depth,
    growth,
    seeds=None,
    name=None,
    compute_dtype='float32',
  ):
    super().__init__(name=name)
    cd = compute_dtype
    self.structure = (in_channels, out_channels, mid_channels, depth, growth, compute_dtype)
    self.project = Conv(in_channels, mid_channels, 1, compute_dtype=cd, seeds=seeds)
    self.dense = DenseConvBlock(mid_channels, mid_channels, depth, growth, True, cd, seeds)
    self.out = Conv(mid_channels, out_channels, 1, zero_init=True, compute_dtype=cd, seeds=seeds)
    self.built = True

  def body(self, x, training=False):
    del training
    return tf.cast(self.out(self.dense(self.project(x))), tf.float32)
