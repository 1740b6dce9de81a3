"""Keras 3 networks used by the DenseFlow bijectors (conditioners)."""

from tf_denseflow.nn.attention import NystromAttention
from tf_denseflow.nn.conv3x3 import conv3x3_same
from tf_denseflow.nn.coupling_net import (
  ContextNetwork,
  CouplingNetwork,
  CrossUnitNetwork,
  DequantCouplingNetwork,
)
from tf_denseflow.nn.dense_net import DenseConvBlock, DenseLayer, GatedConv
from tf_denseflow.nn.layers import (
  BatchNorm,
  BatchNormUpdates,
  Conv,
  Layer,
  Seeds,
  collect_batch_norm_updates,
)

__all__ = [
  'BatchNorm',
  'BatchNormUpdates',
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
  'collect_batch_norm_updates',
  'conv3x3_same',
]
