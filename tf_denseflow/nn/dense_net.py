"""Dense block of conv layers with a gated 1x1 output, as in DenseFlow's coupling networks.

Huang et al. Densely connected convolutional networks. CVPR 2017 (the DenseNet connectivity).
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from tf_denseflow.nn import recompute
from tf_denseflow.nn.layers import Conv, Layer, Seeds

__all__ = ['DenseLayer', 'GatedConv', 'DenseConvBlock']


class DenseLayer(Layer):
  """`concat[x, relu(conv3x3(relu(conv1x1(x))))]`: adds `growth` channels (c -> c + growth)."""

  def __init__(self, channels, growth, compute_dtype='float32', seeds=None, name=None):
    super().__init__(name=name)
    cd = compute_dtype
    self.conv_in = Conv(channels, channels, 1, compute_dtype=cd, seeds=seeds, activation='relu')
    self.conv_out = Conv(channels, growth, 3, compute_dtype=cd, seeds=seeds, activation='relu')
    self.built = True

  def new_channels(
    self, x: tf.Tensor | Sequence[tf.Tensor], flat_pieces: Optional[recompute.FlatPieces] = None
  ) -> tf.Tensor:
    """The `growth` new channels; `x` a tensor or the list of pieces it concatenates (`Conv`)."""
    return self.conv_out(self.conv_in(x, flat_pieces=flat_pieces))

  def call(self, x):
    h = self.new_channels(x)
    return tf.concat([tf.cast(x, h.dtype), h], axis=-1)


class GatedConv(Layer):
  """Gated 1x1 conv: `a + b * sigmoid(c)` with `[a, b, c]` the three channel thirds.

  Note: this is DenseFlow's gate, not the GLU `a * sigmoid(b)`.
  """

  def __init__(self, in_channels, out_channels, compute_dtype='float32', seeds=None, name=None):
    super().__init__(name=name)
    self.conv = Conv(in_channels, 3 * out_channels, 1, compute_dtype=compute_dtype, seeds=seeds)
    self.built = True

  def call(
    self, x: tf.Tensor | Sequence[tf.Tensor], flat_pieces: Optional[recompute.FlatPieces] = None
  ) -> tf.Tensor:
    a, b, c = tf.split(self.conv(x, flat_pieces=flat_pieces), 3, axis=-1)
    return a + b * tf.sigmoid(c)


class DenseConvBlock(Layer):
  """`depth` dense layers (growth `growth`) then a gated 1x1 conv to `out_channels`.

  With `residual=True` the block returns `x + block(x)` (used by the dequantization flow).

  Memory: layer j's input is `concat[x, g_1, .., g_j]` (the block input and the new channels
  of the layers before it). The block hands the 1x1 convs the pieces, not the concatenation,
  so where a gradient may be taken the backward pass rebuilds each concatenation from pieces
  it keeps anyway instead of keeping it (`nn.recompute`; with `Conv`'s CPU kernels, the
  default without a GPU). Same values and gradients.
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    depth: int,
    growth: int,
    residual: bool = False,
    compute_dtype: str = 'float32',
    seeds: Optional[Seeds] = None,
    name: Optional[str] = None,
  ):
    super().__init__(name=name)
    if residual and in_channels != out_channels:
      raise ValueError('A residual dense block needs `in_channels == out_channels`.')
    self.residual = residual
    self.dense_layers = []
    channels = in_channels
    for _ in range(depth):
      self.dense_layers.append(DenseLayer(channels, growth, compute_dtype, seeds))
      channels += growth
    # Keras 3 wraps a list attribute in a type that tf.train.Checkpoint does not follow, so each
    # dense layer is also an attribute of its own (their checkpoint keys: dense_layer_0, ...).
    for j, layer in enumerate(self.dense_layers):
      setattr(self, f'dense_layer_{j}', layer)
    self.gate = GatedConv(channels, out_channels, compute_dtype, seeds)
    self.built = True

  def call(self, x):
    pieces, flat_pieces = [x], recompute.FlatPieces()
    for layer in self.dense_layers:
      pieces.append(layer.new_channels(pieces, flat_pieces=flat_pieces))
    h = self.gate(pieces, flat_pieces=flat_pieces)
    if self.residual:
      h = tf.cast(x, h.dtype) + h
    return h
