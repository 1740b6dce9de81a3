"""Keras 3 building blocks with the official model's initialisation: conv, batch norm, seeds.

Layers build their weights in the constructor (shapes are known there), so a model is complete
as soon as it is constructed. Weights are created through `add_weight`, so checkpoints key them
by attribute path. Compute runs in `compute_dtype` ('float32' or 'bfloat16'); weights stay
float32 and are cast on use.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import keras
import tensorflow as tf

__all__ = ['Layer', 'Seeds', 'Conv', 'BatchNorm', 'torch_uniform', 'zeros']

Layer = keras.layers.Layer


class Seeds:
  """A deterministic stream of integer seeds for weight initialisation."""

  def __init__(self, seed: int = 0):
    self._seed = int(seed)
    self._count = 0

  def __call__(self) -> tf.Tensor:
    """Returns the next stateless seed, a `[2]` int32 tensor."""
    self._count += 1
    return tf.constant([self._seed, self._count], tf.int32)


def torch_uniform(fan_in: int, seeds: Optional[Seeds]) -> Callable:
  """PyTorch's default conv init, `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` (kaiming_uniform, a=sqrt(5))."""
  bound = 1.0 / math.sqrt(fan_in)
  seed = (seeds or Seeds())()

  def init(shape, dtype=None):
    return tf.random.stateless_uniform(
      shape, seed=seed, minval=-bound, maxval=bound, dtype=dtype or tf.float32
    )

  return init


def zeros(shape, dtype=None):
  return tf.zeros(shape, dtype or tf.float32)


class Conv(Layer):
  """2-D convolution, NHWC, with PyTorch's default init or zeros.

  1x1 convolutions with stride 1 run as a matmul on the `[N*H*W, C]` view (faster on CPU).
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 1,
    strides: int = 1,
    padding: str = 'same',
    use_bias: bool = True,
    zero_init: bool = False,
    compute_dtype: str = 'float32',
    seeds: Optional[Seeds] = None,
    name: Optional[str] = None,
  ):
    super().__init__(name=name)
    self.in_channels = int(in_channels)
    self.out_channels = int(out_channels)
    self.kernel_size = int(kernel_size)
    self.strides = int(strides)
    self.padding = padding.upper()
    self.use_bias = use_bias
    self.compute_dtype_name = compute_dtype
    fan_in = self.in_channels * self.kernel_size**2
    shape = (self.kernel_size, self.kernel_size, self.in_channels, self.out_channels)
    self.kernel = self.add_weight(
      shape=shape,
      initializer=zeros if zero_init else torch_uniform(fan_in, seeds),
      name='kernel',
    )
    self.bias = None
    if use_bias:
      self.bias = self.add_weight(
        shape=(self.out_channels,),
        initializer=zeros if zero_init else torch_uniform(fan_in, seeds),
        name='bias',
      )
    self.built = True

  def call(self, x):
    if x.shape[-1] is not None and x.shape[-1] != self.in_channels:
      raise ValueError(
        f'{self.name}: expected {self.in_channels} input channels, got shape {x.shape}.'
      )
    dtype = tf.as_dtype(self.compute_dtype_name)
    x = tf.cast(x, dtype)
    kernel = tf.cast(self.kernel, dtype)
    if self.kernel_size == 1 and self.strides == 1:
      flat = tf.reshape(x, [-1, self.in_channels])
      y = tf.matmul(flat, tf.reshape(kernel, [self.in_channels, self.out_channels]))
      y = tf.reshape(y, tf.concat([tf.shape(x)[:-1], [self.out_channels]], 0))
    else:
      y = tf.nn.conv2d(x, kernel, strides=self.strides, padding=self.padding)
    if self.bias is not None:
      y = tf.nn.bias_add(y, tf.cast(self.bias, dtype))
    return y


class BatchNorm(Layer):
  """Batch normalisation over N, H, W with PyTorch's semantics (eps 1e-5, momentum 0.1).

  Training: normalise with the batch's biased variance; update the running mean and the running
  *unbiased* variance as `r = (1 - momentum) * r + momentum * batch`. Evaluation: running stats.
  Statistics are computed in float32 whatever the input dtype.
  """

  def __init__(
    self, channels: int, momentum: float = 0.1, epsilon: float = 1e-5, name: Optional[str] = None
  ):
    super().__init__(name=name)
    self.channels = int(channels)
    self.momentum = float(momentum)
    self.epsilon = float(epsilon)
    self.gamma = self.add_weight(shape=(channels,), initializer='ones', name='gamma')
    self.beta = self.add_weight(shape=(channels,), initializer='zeros', name='beta')
    self.moving_mean = self.add_weight(
      shape=(channels,),
      initializer='zeros',
      trainable=False,
      aggregation='mean',
      name='moving_mean',
    )
    self.moving_variance = self.add_weight(
      shape=(channels,),
      initializer='ones',
      trainable=False,
      aggregation='mean',
      name='moving_variance',
    )
    self.built = True

  def call(self, x, training=False):
    dtype = x.dtype
    x32 = tf.cast(x, tf.float32)
    if training:
      mean, variance = tf.nn.moments(x32, axes=[0, 1, 2])
      count = tf.cast(tf.reduce_prod(tf.shape(x32)[:-1]), tf.float32)
      unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
      m = self.momentum
      self.moving_mean.assign((1.0 - m) * self.moving_mean + m * tf.stop_gradient(mean))
      self.moving_variance.assign((1.0 - m) * self.moving_variance + m * tf.stop_gradient(unbiased))
    else:
      mean, variance = self.moving_mean, self.moving_variance
    y = tf.nn.batch_normalization(x32, mean, variance, self.beta, self.gamma, self.epsilon)
    return tf.cast(y, dtype)
