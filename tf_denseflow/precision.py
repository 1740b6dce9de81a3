"""Mixed precision: `--precision` and the dynamic loss scale that float16 training needs.

`--precision` (`PRECISIONS`) is the compute dtype of the conditioner networks (the coupling
networks, the cross-unit networks, the variational dequantization's context and coupling
networks), the model's `DenseFlowConfig.coupling_dtype`. Whatever it is, the weights, the optimizer, the batch-norm
statistics, the attention core and the bijector math (affine maps, log-dets, base
log-probabilities) stay float32:
```
float32    everything float32 (default)
bfloat16   the networks' convolutions and activations in bfloat16 (AMX / AVX512-BF16 matmuls on
           Intel Xeon CPUs that have them, docs/benchmarks.md); float32's exponent
           range, so gradients neither underflow nor overflow and no loss scaling is needed
float16    the same in float16 (5 exponent bits): small gradients underflow to 0 in the backward
           pass through the networks, so the loss is scaled up before the gradient and the
           gradients scaled back down (`DynamicLossScale`)
```

Dynamic loss scaling (Keras's `LossScaleOptimizer` rules, its defaults):
```
grads = d(loss * scale)/dw / scale                       # scale a power of 2: exact unscaling
step skipped because a gradient is Inf/NaN (an overflow):  scale <- max(scale / 2, min_scale)
growth_steps applied steps in a row:                      scale <- min(scale * 2, max_scale)
```
An overflow leaves the weights and the optimizer untouched: it is the training step's usual
non-finite guard (`train_step.SKIP_REASONS`) that skips it.

Why not `keras.optimizers.LossScaleOptimizer`: the training step already sums the gradients
itself, checks them (finite loss, gradient norm, batch-norm statistics, `Adamax.update_is_safe`)
and applies them inside a MirroredStrategy `merge_call` (as an update that is a no-op when the
step is skipped, `Adamax.apply_if`). The wrapper would make a second, silent finiteness
decision inside it (and its own cross-replica `cond`, which cannot nest in our `merge_call`), would hide the skip reason, and would move the Adamax
slots under `inner_optimizer` in checkpoints (old checkpoints would no longer load). The scale
here is a small module of two variables, updated by the step in cross-replica context from the
step's own verdict, and checkpointed with the trainer (`Trainer.loss_scale`).
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tf_denseflow.config import COUPLING_DTYPES

__all__ = ['DynamicLossScale', 'PRECISIONS', 'loss_scale_for']

PRECISIONS = COUPLING_DTYPES  # 'float32', 'bfloat16', 'float16'


class DynamicLossScale(tf.Module):
  """The loss scale of float16 training: halved on overflow, doubled after good steps.

  Create it in the distribution strategy's scope (its variables are then mirrored) and call
  `update` in cross-replica context once per step, as `train_step.make_train_step` does.

  Variables (both checkpointed, non-trainable): `scale` (float32 scalar, a power of 2) and
  `good_steps` (int64: applied steps since the last change of the scale).

  Args:
    initial_scale: the first scale (Keras: 2**15); a power of 2.
    growth_steps: applied steps in a row after which the scale doubles (Keras: 2000).
    min_scale: the scale is never halved below this (a power of 2, default 1: below it an overflow
      is a real non-finite gradient, which the step reports as such).
    max_scale: the scale is never doubled above this (a power of 2, default 2**64).
    name: module name.

  Raises:
    ValueError: a scale that is not a positive power of 2 in float32's range, `min_scale >
      initial_scale` or `initial_scale > max_scale`, or `growth_steps < 1`.
  """

  def __init__(
    self,
    initial_scale: float = 2.0**15,
    growth_steps: int = 2000,
    min_scale: float = 1.0,
    max_scale: float = 2.0**64,
    name: str = 'loss_scale',
  ):
    super().__init__(name=name)
    for arg, value in (
      ('initial_scale', initial_scale),
      ('min_scale', min_scale),
      ('max_scale', max_scale),
    ):
      _check_power_of_two(arg, value)
    if not min_scale <= initial_scale <= max_scale:
      raise ValueError(
        f'Need min_scale <= initial_scale <= max_scale, got {min_scale}, {initial_scale}, '
        f'{max_scale}.'
      )
    if isinstance(growth_steps, bool) or int(growth_steps) != growth_steps or growth_steps < 1:
      raise ValueError(f'`growth_steps` must be an int >= 1, got {growth_steps!r}.')
    self.growth_steps = int(growth_steps)
    self.min_scale = float(min_scale)
    self.max_scale = float(max_scale)
    with self.name_scope:
      self.scale = tf.Variable(
        float(initial_scale), dtype=tf.float32, trainable=False, name='scale'
      )
      self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name='good_steps')

  def can_shrink(self) -> tf.Tensor:
    """Whether the scale is above `min_scale` (bool scalar): an overflow can still be absorbed."""
    return self.scale > self.min_scale

  def update(self, applied: tf.Tensor, overflow: tf.Tensor) -> tf.Operation:
    """Advances the scale after a step (cross-replica context).

    Args:
      applied: bool scalar, the step's update was applied.
      overflow: bool scalar, the step was skipped for a gradient overflow (halve the scale).
        A step that is neither (skipped for another reason) changes nothing.

    Returns:
      The op (or, eagerly, None) that assigns both variables.
    """
    good = tf.where(applied, self.good_steps + 1, tf.zeros_like(self.good_steps))
    grow = applied & (good >= self.growth_steps)
    scale = tf.where(grow, tf.minimum(self.scale * 2.0, self.max_scale), self.scale)
    scale = tf.where(overflow, tf.maximum(self.scale * 0.5, self.min_scale), scale)
    good = tf.where(grow, tf.zeros_like(good), good)
    return tf.group(self.scale.assign(scale), self.good_steps.assign(good))


def _check_power_of_two(arg: str, value) -> None:
  try:
    mantissa_is_one = float(value) > 0.0 and (float(value)).hex().startswith('0x1.0000000000000p')
  except (TypeError, ValueError, OverflowError):
    mantissa_is_one = False
  if not mantissa_is_one or not 2.0**-126 <= float(value) <= 2.0**127:
    raise ValueError(f'`{arg}` must be a power of 2 in float32 range, got {value!r}.')


def loss_scale_for(precision: str, **kwargs) -> Optional[DynamicLossScale]:
  """A `DynamicLossScale` for 'float16', None for 'float32' and 'bfloat16' (no scaling needed).

  Create it inside the strategy's scope. `kwargs` go to `DynamicLossScale`.

  Raises:
    ValueError: `precision` is not one of `PRECISIONS`.
  """
  if precision not in PRECISIONS:
    raise ValueError(f'`precision` must be one of {PRECISIONS}, got {precision!r}.')
  return DynamicLossScale(**kwargs) if precision == 'float16' else None
