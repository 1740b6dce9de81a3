"""Keras 3 networks used by the DenseFlow bijectors (conditioners)."""

from tf_denseflow.nn.attention import NystromAttention
from tf_denseflow.nn.coupling_net import (
  ContextNetwork,
  CouplingNetwork,
  CrossUnitNetwork,
  DequantCouplingNetwork,
)
from tf_denseflow.nn.dense_net import DenseConvBlock, DenseLayer, GatedConv
from tf_denseflow.nn.layers import BatchNorm, Conv, Layer, Seeds

__all__ = [
  'BatchNorm',
  'ContextNetwork',
  'Conv',
  'CouplingNetwork',
  'CrossUnitNetwork',
  'DenseConvBlock',
  'DenseLayer',
  'DequantCouplingNetwork',
  'GatedConv',
  'Layer',
  'NystromAttention',
  'Seeds',
]
