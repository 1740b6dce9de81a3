"""Keras 3 building blocks with the official model's initialisation: conv, batch norm, seeds.

Layers build their weights in the constructor (shapes are known there), so a model is complete
as soon as it is constructed. Weights are created through `add_weight`, so checkpoints key them
by attribute path. Compute runs in `compute_dtype` ('float32', 'bfloat16' or 'float16'); weights
stay float32 and are cast on use; batch-norm statistics are always float32. Which convolution
kernels `Conv` traces (CPU-tuned matmuls or `tf.nn.conv2d`) is `tf_denseflow.kernels`' switch.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from tf_denseflow import kernels, shapes
from tf_denseflow.nn import conv3x3, recompute

__all__ = [
  'BatchNorm',
  'BatchNormUpdates',
  'Conv',
  'Layer',
  'Seeds',
  'collect_batch_norm_updates',
  'torch_uniform',
  'zeros',
]

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


def _empty_batch_safe(x, y, out_channels: int, kernel_size: int, strides: int, padding: str):
  """`y = conv2d(x)` with the right shape for a (static) empty batch too.

  TF 2.21's oneDNN `Conv2D` on Intel AMX CPUs returns its *input* for an empty batch (`[0, 2, 2,
  16]` in, `[0, 2, 2, 16]` out for 8 output channels; BUILD.md, "Known TF bugs"). Both have zero
  elements, so a reshape to the shape the convolution must have is valid. Only for a batch known
  to be empty (eager mode): grappler removes such a reshape from graphs, so the model's traced
  inference paths skip empty batches themselves (`DenseFlow`'s `_unless_empty`).
  """
  if x.shape[0] != 0:
    return y
  h, w = x.shape[1], x.shape[2]
  if padding == 'SAME':
    h, w = -(-h // strides), -(-w // strides)
  else:
    h, w = (h - kernel_size) // strides + 1, (w - kernel_size) // strides + 1
  return tf.reshape(y, [0, h, w, out_channels])


class Conv(Layer):
  """2-D convolution, NHWC, with PyTorch's default init or zeros, and an optional ReLU.

  `x` `[N, H, W, in_channels]` (any float dtype, cast to `compute_dtype`) -> `[N, H', W',
  out_channels]` in `compute_dtype`. With the 'cpu' kernels (`tf_denseflow.kernels`, the default
  on a machine without a GPU), 1x1 convolutions with stride 1 run as a matmul on the
  `[N*H*W, C]` view and 3x3 'same' convolutions with stride 1 differentiate through
  `conv3x3_same` (both faster on CPU); with the 'library' kernels every convolution is
  `tf.nn.conv2d` (cuDNN on a GPU).

  Raises:
    ValueError: at construction, an unknown `activation`; when called, an input whose last
      dimension is not `in_channels`.
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
    activation: Optional[str] = None,
    name: Optional[str] = None,
  ):
    # No Keras autocast: `call` casts to the compute dtype itself, and an autocast copy of each
    # piece would be a new tensor for every layer (`nn.recompute.FlatPieces` keys on tensors).
    super().__init__(name=name, autocast=False)
    if activation not in (None, 'relu'):
      raise ValueError(f"`activation` must be None or 'relu', got {activation!r}.")
    self.activation = activation
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

  def call(
    self,
    x: tf.Tensor | Sequence[tf.Tensor],
    flat_pieces: Optional[recompute.FlatPieces] = None,
  ) -> tf.Tensor:
    """`x`: a tensor, or a list of tensors whose concatenation along the channels is the input
    (a dense block's; a 1x1 matmul then does not keep the concatenation for the gradient:
    `nn.recompute`). `flat_pieces`: the caller's, kept across calls, so that each piece is
    reshaped to `[N*H*W, C_i]` once (a dense block's pieces feed every later layer)."""
    pieces = list(x) if isinstance(x, (list, tuple)) else [x]
    channels = [p.shape[-1] for p in pieces]
    if None not in channels and sum(channels) != self.in_channels:
      got = ', '.join(str(p.shape) for p in pieces)
      raise ValueError(f'{self.name}: expected {self.in_channels} input channels, got {got}.')
    if len(pieces) == 1 and channels[0] is None:
      channels = [self.in_channels]  # one tensor: the channels it must have
    dtype = tf.as_dtype(self.compute_dtype_name)
    kernel = tf.cast(self.kernel, dtype)
    bias = None if self.bias is None else tf.cast(self.bias, dtype)
    cpu_kernels = kernels.resolve() == 'cpu'
    if cpu_kernels and self.kernel_size == 1 and self.strides == 1 and None not in channels:
      # Bias and activation on the flat view, so grappler fuses them into the matmul.
      flat_of = recompute.FlatPieces() if flat_pieces is None else flat_pieces
      flat = [flat_of(p, c, dtype) for p, c in zip(pieces, channels)]
      kernel = tf.reshape(kernel, [self.in_channels, self.out_channels])
      y = self._bias_and_activation(recompute.matmul_of_concatenation(flat, kernel), bias)
      return tf.reshape(
        y, shapes.concat_shape(shapes.shape_of(pieces[0])[:-1], [self.out_channels])
      )
    pieces = [tf.cast(p, dtype) for p in pieces]
    x = pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=-1)
    if (
      cpu_kernels
      and self.kernel_size == 3
      and self.strides == 1
      and self.padding == 'SAME'
      and x.shape.rank == 4
      and x.shape[1] is not None
      and x.shape[2] is not None
    ):
      y = conv3x3.conv3x3_same(x, kernel)
    else:
      y = tf.nn.conv2d(x, kernel, strides=self.strides, padding=self.padding)
    y = _empty_batch_safe(x, y, self.out_channels, self.kernel_size, self.strides, self.padding)
    return self._bias_and_activation(y, bias)

  def _bias_and_activation(self, y, bias):
    if bias is not None:
      y = tf.nn.bias_add(y, bias)
    if self.activation == 'relu':
      y = tf.nn.relu(y)
    return y


class BatchNormUpdates:
  """Running-statistics updates recorded by `BatchNorm(training=True)` instead of assigned.

  Made by `collect_batch_norm_updates()`. Each recorded call chains on the previous one of the
  same layer, `r <- (1 - momentum) r + momentum * batch`, starting from the variable's value, so
  applying `new_values` equals the assignments the calls would have made. After `freeze()`
  further calls record nothing (a gradient's recomputation replays the forward pass).
  """

  def __init__(self):
    self._values: Dict[int, Tuple[BatchNorm, tf.Tensor, tf.Tensor]] = {}
    self.frozen = False

  def freeze(self) -> None:
    """Ignores every later call (use before `tape.gradient` with `tf.recompute_grad`)."""
    self.frozen = True

  def record(self, layer: BatchNorm, mean: tf.Tensor, unbiased_variance: tf.Tensor) -> None:
    if self.frozen:
      return
    old_mean, old_variance = self._current(layer)
    m = layer.momentum
    self._values[id(layer)] = (
      layer,
      (1.0 - m) * old_mean + m * tf.stop_gradient(mean),
      (1.0 - m) * old_variance + m * tf.stop_gradient(unbiased_variance),
    )

  def new_values(self, layers: Sequence[BatchNorm]) -> List[tf.Tensor]:
    """`[mean_0, variance_0, mean_1, ...]` for `layers` (unrecorded ones: their current values)."""
    out = []
    for layer in layers:
      out.extend(tf.identity(value) for value in self._current(layer))
    return out

  def _current(self, layer: BatchNorm) -> Tuple[tf.Tensor, tf.Tensor]:
    """The latest recorded `(mean, variance)` of `layer`, else its variables' values."""
    if id(layer) in self._values:
      return self._values[id(layer)][1:]
    return layer.moving_mean.value, layer.moving_variance.value


_COLLECTORS = threading.local()


@contextlib.contextmanager
def collect_batch_norm_updates(
  updates: Optional[BatchNormUpdates] = None,
) -> Iterator[BatchNormUpdates]:
  """Within this context `BatchNorm(training=True)` records, not assigns, its running statistics.

  A training step that must not assign inside its loss function uses it: a replica function of
  `tf.distribute.MirroredStrategy` (a MEAN-aggregated assign there needs a `merge_call`, which an
  XLA-compiled function cannot hold), or a loss under `tf.recompute_grad` (whose recomputation
  would update the statistics a second time):
  ```
  with collect_batch_norm_updates() as updates:
    with tf.GradientTape() as tape:
      loss = ...
    updates.freeze()
    grads = tape.gradient(loss, variables)
  values = updates.new_values(layers)   # assign later, e.g. all-reduced across replicas
  ```
  """
  stack = getattr(_COLLECTORS, 'stack', None)
  if stack is None:
    stack = _COLLECTORS.stack = []
  updates = BatchNormUpdates() if updates is None else updates
  stack.append(updates)
  try:
    yield updates
  finally:
    stack.pop()


def _active_collector() -> Optional[BatchNormUpdates]:
  stack = getattr(_COLLECTORS, 'stack', None)
  return stack[-1] if stack else None


class BatchNorm(Layer):
  """Batch normalisation over N, H, W with PyTorch's semantics (eps 1e-5, momentum 0.1).

  Training: normalise with the batch's biased variance; update the running mean and the running
  *unbiased* variance as `r = (1 - momentum) * r + momentum * batch` (assigned at once, or
  recorded inside `collect_batch_norm_updates()`). Evaluation: running stats. Statistics are
  computed in float32 whatever the input dtype.
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
      count = shapes.cast(shapes.num_elements(shapes.shape_of(x32)[:-1]), tf.float32)
      unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
      self.update_statistics(mean, unbiased)
    else:
      mean, variance = self.moving_mean, self.moving_variance
    y = tf.nn.batch_normalization(x32, mean, variance, self.beta, self.gamma, self.epsilon)
    return tf.cast(y, dtype)

  def update_statistics(self, mean: tf.Tensor, unbiased_variance: tf.Tensor) -> None:
    """Running statistics after a batch: recorded in `collect_batch_norm_updates()`, else assigned."""
    collector = _active_collector()
    if collector is not None:
      collector.record(self, mean, unbiased_variance)
      return
    m = self.momentum
    self.moving_mean.assign((1.0 - m) * self.moving_mean + m * tf.stop_gradient(mean))
    self.moving_variance.assign(
      (1.0 - m) * self.moving_variance + m * tf.stop_gradient(unbiased_variance)
    )
