"""Adamax for the training step: one fused kernel per variable, gradients applied as given.

Keras 3's `Adamax.update_step` is about ten element-wise ops per variable (each a pass over
the variable's memory and an executor dispatch):
```
m <- m + (g - m) (1 - beta_1)
u <- max(beta_2 u, |g|)
w <- w - lr m / ((1 - beta_1^t) (u + eps)),     t = iterations + 1
```
`Adamax` here computes the same update with TF's `ResourceApplyAdaMax` kernel, which does it in
one pass (`w -= lr / (1 - beta_1^t) * m / (u + eps)`: equal up to float rounding). Slots,
hyper-parameters and checkpoints are Keras's `Adamax`'s, so checkpoints of either load in
the other.

The kernel's scalar inputs (`beta_1^t`, `lr`, `beta_1`, `beta_2`, `eps` in the variable's dtype)
are the same for every variable: `apply` makes them once per step (per device and dtype) and
passes them to every variable's kernel, so the traced update is one op per variable instead of
ten (a read of `iterations`, `+ 1`, two casts, `pow`, four constants and the kernel; eleven with
a read of the learning rate when it is a variable). The values are the same, computed once: the
result is bit-identical to calling `update_step` per variable.

The kernel writes in place, so whether an update would be finite has to be known before it runs
(`Adamax.update_is_safe`). With valid hyper-parameters (checked by the constructor) and
gradients whose global norm is finite (the training step checks that, so every entry is at most
`sqrt(float32 max)` ~ 1.8e19), the update is bounded without looking at the slots:
```
|m| <= C u   for every entry, by induction from m = u = 0, when beta_1 < beta_2:
             |m'| <= beta_1 |m| + (1 - beta_1) |g| <= (beta_1 C / beta_2 + 1 - beta_1) u' = C u'
             with u' = max(beta_2 u, |g|) and C = beta_2 (1 - beta_1) / (beta_2 - beta_1) (~1.01)
|m| <= max |g| <= sqrt(float32 max)        (m is an average of applied gradients; any betas)
|dw| = lr / (1 - beta_1^t) |m| / (u + eps) <= lr / (1 - beta_1^t) min(C, sqrt(float32 max) / eps)
```
`m` and `u` never overflow (their inputs are bounded as above), and `w - dw` for a finite `w`
stays finite when `|dw|` is below half a unit in the last place of the largest float32 (2**103).
So the update is finite whenever that bound is finite and below `UPDATE_LIMIT` (2**100, a
margin for rounding); only a learning rate near the float32 range fails it (e.g. 1e37 overflows
`lr / (1 - beta_1)`, and with `m = 0` the kernel then computes Inf * 0 = NaN).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict

import keras
import numpy as np
import tensorflow as tf

from tf_denseflow import checks

__all__ = ['Adamax', 'UPDATE_LIMIT', 'WarmupSchedule']

# The largest update the guard lets through (see the module docstring).
UPDATE_LIMIT = 2.0**100
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_GRADIENT_LIMIT = math.sqrt(_FLOAT32_MAX)  # largest entry of a gradient with a finite norm


def _name(variable) -> str:
  return getattr(variable, 'path', None) or variable.name


def _resource(variable):
  """The `tf.Variable` behind a Keras variable (or the variable itself)."""
  return variable.value if isinstance(variable, keras.Variable) else variable


class Adamax(keras.optimizers.Adamax):
  """`keras.optimizers.Adamax` with a fused update that applies gradients as given.

  Keras sums the gradients over replicas inside `apply` (`_all_reduce_sum_gradients`); the
  training step needs the summed gradients before the update (finiteness check, gradient norm),
  so it reduces them itself and this class skips the second reduction. Use it only where the
  caller has reduced the gradients already (`train_step.make_train_step`) or runs one replica.

  The constructor refuses hyper-parameters that make the update non-finite (NaN or infinite
  learning rate, `epsilon` that is not a normal float32, betas outside [0, 1) in float32), and
  `update_is_safe` says before an update whether it can overflow (module docstring).

  Raises:
    ValueError, TypeError: a bad hyper-parameter (the message names it), or `weight_decay`
      (not covered by the update bound).
  """

  def __init__(
    self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, name='adamax', **kwargs
  ):
    if kwargs.get('weight_decay') is not None:
      raise ValueError('`weight_decay` is not supported by optim.Adamax (no update bound for it).')
    if not callable(learning_rate) and not isinstance(learning_rate, keras.Variable):
      checks.check_float('learning_rate', learning_rate, 0.0, maximum=_FLOAT32_MAX)
    for arg, value in (('beta_1', beta_1), ('beta_2', beta_2)):
      checks.check_float(arg, value, 0.0)
      if not np.float32(value) < 1.0:  # beta_1 rounded to 1 makes 1 - beta_1^t zero
        raise ValueError(f'`{arg}` must be < 1 in float32, got {value!r}.')
    checks.check_float('epsilon', epsilon, _FLOAT32_TINY, maximum=_FLOAT32_MAX)
    super().__init__(
      learning_rate=learning_rate,
      beta_1=beta_1,
      beta_2=beta_2,
      epsilon=epsilon,
      name=name,
      **kwargs,
    )

  def update_bound(self, learning_rate=None) -> tf.Tensor:
    """An upper bound of `|dw|` over every entry of the next update, float32 (may be Inf/NaN).

    Holds for any gradients with a finite global norm (module docstring).

    Args:
      learning_rate: the learning rate of the update (default: the optimizer's current one).
    """
    if learning_rate is None:
      learning_rate = self.learning_rate
    b1, b2 = float(np.float32(self.beta_1)), float(np.float32(self.beta_2))
    ratio = _GRADIENT_LIMIT / float(np.float32(self.epsilon))
    if b1 < b2:
      ratio = min(ratio, b2 * (1.0 - b1) / (b2 - b1))
    # The kernel's own arithmetic: lr / (1 - beta_1^t) in float32.
    beta_1_power = tf.pow(tf.constant(b1, tf.float32), tf.cast(self.iterations + 1, tf.float32))
    corrected = tf.cast(learning_rate, tf.float32) / (1.0 - beta_1_power)
    return corrected * tf.constant(ratio, tf.float32)

  def update_is_safe(self, learning_rate=None) -> tf.Tensor:
    """Whether the next update is finite for any gradients with a finite global norm (bool)."""
    bound = self.update_bound(learning_rate)
    return tf.math.is_finite(bound) & (bound <= UPDATE_LIMIT)

  def _all_reduce_sum_gradients(self, grads_and_vars):
    return list(grads_and_vars)

  def kernel_scalars(self, dtype, learning_rate) -> Dict[str, tf.Tensor]:
    """The scalar inputs of this step's `ResourceApplyAdaMax`, shared by every variable.

    Args:
      dtype: the variables' dtype (the kernel takes its scalars in it).
      learning_rate: the step's learning rate (a tensor, variable or float).

    Returns:
      `{beta1_power, lr, beta1, beta2, epsilon}`, scalars of `dtype`; `beta1_power` is
      `beta_1 ** (iterations + 1)` read now (before `apply` increments `iterations`).
    """
    beta_1 = tf.cast(self.beta_1, dtype)
    return {
      'beta1_power': tf.pow(beta_1, tf.cast(self.iterations + 1, dtype)),
      'lr': tf.cast(learning_rate, dtype),
      'beta1': beta_1,
      'beta2': tf.cast(self.beta_2, dtype),
      'epsilon': tf.cast(self.epsilon, dtype),
    }

  def _apply_kernel(self, gradient, variable, scalars: Dict[str, tf.Tensor]) -> None:
    """`ResourceApplyAdaMax` on `variable` and its slots, with `kernel_scalars`'s scalars."""
    index = self._get_variable_index(variable)
    if gradient.dtype != variable.dtype:  # no Cast op when it already is the variable's dtype
      gradient = tf.cast(gradient, variable.dtype)
    tf.raw_ops.ResourceApplyAdaMax(
      var=_resource(variable).handle,
      m=_resource(self._m[index]).handle,
      v=_resource(self._u[index]).handle,
      grad=gradient,
      **scalars,
    )

  def apply_if(self, condition: tf.Tensor, grads, trainable_variables) -> None:
    """`apply(grads, trainable_variables)` if `condition` (a bool scalar tensor), else nothing.

    Without a `tf.cond`: every variable's kernel runs either way. When `condition` is False its
    gradient is zero (`multiply_no_nan`, so NaN and Inf entries too) and its scalars are
    `beta1_power = 0, lr = 0, beta1 = beta2 = 1`, for which `ResourceApplyAdaMax` leaves the
    variable and its slots as they are (`m + (0 - m) * 0 = m`, `max(1 * u, 0) = u`,
    `w - 0 / 1 * m / (u + eps) = w` for the finite `w`, `m` and `u >= 0` that the guard keeps,
    `m / (u + eps)` being finite because `|m| <= C u` or `|m| <= sqrt(float32 max)`, module
    docstring; only a -0.0 entry may come back as +0.0, the same value), and `iterations` is
    not incremented. When True it is exactly `apply`: the gradient times 1, the same scalars.
    Why: in the training step a `tf.cond` around the update captures three handles and a
    gradient per variable and cond_v2 gives its other branch a dummy input for each (~18% of
    `small`'s tracing time, ~10 graph nodes per variable; docs/benchmarks.md section 5.4).

    Args:
      condition: bool scalar; under a distribution strategy the same on every replica.
      grads: the gradients, one per variable (reduced over replicas already, as `apply`).
      trainable_variables: the variables, which the optimizer was built with.

    Raises:
      ValueError: the optimizer is not built; it clips gradients, keeps an EMA, accumulates
        gradients or scales the loss; a gradient is None; a variable has a constraint or
        `overwrite_with_gradient` (Keras's `apply` features this update does not have).
    """
    for option in ('clipnorm', 'clipvalue', 'global_clipnorm', 'loss_scale_factor'):
      if getattr(self, option, None) is not None:
        raise ValueError(f'`Adamax.apply_if` does not support `{option}`.')
    if self.use_ema or self.gradient_accumulation_steps:
      raise ValueError('`Adamax.apply_if` supports neither `use_ema` nor gradient accumulation.')
    if not self.built:
      raise ValueError('`Adamax.apply_if` needs a built optimizer (`optimizer.build(variables)`).')
    trainable_variables = list(trainable_variables)
    self._check_variables_are_known(trainable_variables)
    for gradient, variable in zip(grads, trainable_variables, strict=True):
      if gradient is None:
        raise ValueError(f'`Adamax.apply_if`: no gradient for {_name(variable)}.')
      if getattr(variable, 'constraint', None) is not None or getattr(
        variable, 'overwrite_with_gradient', False
      ):
        raise ValueError(
          f'`Adamax.apply_if` supports neither constraints nor `overwrite_with_gradient` '
          f'({_name(variable)}).'
        )
    variables = [_resource(v) for v in trainable_variables]
    with keras.name_scope(self.name, caller=self):
      tf.__internal__.distribute.interim.maybe_merge_call(
        self._distributed_tf_update_step,
        self._distribution_strategy,
        list(zip(grads, variables)),
        self.learning_rate,
        condition,
      )
    self._iterations.assign_add(tf.cast(condition, self._iterations.dtype))

  def update_step(self, gradient, variable, learning_rate):
    """Applies one Adamax step to `variable` with `ResourceApplyAdaMax` and its own scalars.

    Keras's per-variable interface; `apply` does not call it, it shares the scalars between
    variables (`_distributed_tf_update_step`), with the same result bit for bit.
    """
    self._apply_kernel(gradient, variable, self.kernel_scalars(variable.dtype, learning_rate))

  def _distributed_tf_update_step(
    self, distribution, grads_and_vars, learning_rate, condition=None
  ):
    """Keras's per-variable `distribution.extended.update` loop, with shared kernel scalars.

    The scalars are made in the first update on each device (MirroredStrategy runs the update
    function under each replica's device; `learning_rate` is that replica's) for each dtype,
    and reused by every later variable there: one set per step, device and dtype. With a
    `condition` (`apply_if`) they are the update's or the no-op's, and each gradient is
    multiplied by it.
    """
    scalars, keep = {}, {}

    def update(variable, gradient, learning_rate, *condition):
      key = (variable.device, variable.dtype)
      if key not in scalars:
        scalars[key] = self.kernel_scalars(variable.dtype, learning_rate)
        if condition:
          apply, dtype = condition[0], variable.dtype
          keep[key] = tf.cast(apply, dtype)
          neutral = {'beta1_power': 0.0, 'lr': 0.0, 'beta1': 1.0, 'beta2': 1.0}
          for name, value in neutral.items():
            scalars[key][name] = tf.where(apply, scalars[key][name], tf.constant(value, dtype))
      if condition:
        # 0 where the step is skipped, even for NaN or Inf entries; g * 1 = g otherwise.
        gradient = tf.math.multiply_no_nan(tf.cast(gradient, variable.dtype), keep[key])
      self._apply_kernel(gradient, variable, scalars[key])

    extra = () if condition is None else (condition,)
    for gradient, variable in grads_and_vars:
      distribution.extended.update(
        variable, update, args=(gradient, learning_rate) + extra, group=False
      )


# -------------------------------------------------------------------------------------------------
# Learning-rate schedule.


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up, then constant or exponential decay, then a constant fine-tune stage.

  ```
  t < train_steps:   lr(t) = learning_rate * min(1, (t + 1) / warmup_steps) * decay(t)
                     decay(t) = 1 (constant) or lr_decay_gamma ** floor(t / steps_per_epoch)
  t >= train_steps:  lr(t) = finetune_lr
  ```
  `t` is the 0-based global step. The warm-up uses `(t + 1)`, so the first step already moves
  the weights; the official `LinearWarmupScheduler` gives `t / warmup` (its first step runs at
  lr 0). 'constant' is what the official commands effectively run (their warm-up scheduler
  resets the exponential decay every step, denseflow_spec.md section 4.2); 'exponential' is the
  paper's description, with the decay counted from step 0 as `ExponentialLR` per epoch does.
  """

  def __init__(self, config, steps_per_epoch: int = 1):
    super().__init__()
    self.config = config
    self.steps_per_epoch = max(1, int(steps_per_epoch))

  def __call__(self, step):
    c = self.config
    t = tf.cast(step, tf.float32)
    warmup = tf.minimum(1.0, (t + 1.0) / float(max(1, c.warmup_steps)))
    lr = c.learning_rate * warmup
    if c.lr_schedule == 'exponential':
      epoch = tf.floor(t / float(self.steps_per_epoch))
      lr = lr * tf.pow(tf.constant(c.lr_decay_gamma, tf.float32), epoch)
    return tf.where(t < float(c.train_steps), lr, tf.constant(c.finetune_lr, tf.float32))

  def get_config(self) -> dict:
    return {'config': dataclasses.asdict(self.config), 'steps_per_epoch': self.steps_per_epoch}
