"""DenseFlow's exact bijections as `tfp.bijectors.Bijector`s (forward = sampling, z -> x)."""

from tf_denseflow.bijectors.actnorm import ActNorm
from tf_denseflow.bijectors.affine_coupling import AffineCoupling
from tf_denseflow.bijectors.channel_swap import ChannelSwap
from tf_denseflow.bijectors.conv1x1 import InvertibleConv1x1
from tf_denseflow.bijectors.cross_unit import CrossUnitCoupling
from tf_denseflow.bijectors.dense_block import DenseBlock
from tf_denseflow.bijectors.flow_bijector import FlowBijector
from tf_denseflow.bijectors.glow_step import GlowStep
from tf_denseflow.bijectors.squeeze import Squeeze
from tf_denseflow.bijectors.transition import Transition

__all__ = [
  'ActNorm',
  'AffineCoupling',
  'ChannelSwap',
  'CrossUnitCoupling',
  'DenseBlock',
  'FlowBijector',
  'GlowStep',
  'InvertibleConv1x1',
  'Squeeze',
  'Transition',
]
