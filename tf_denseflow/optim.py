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
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ['Adamax']


def _resource(variable):
  """The `tf.Variable` behind a Keras variable (or the variable itself)."""
  return variable.value if isinstance(variable, keras.Variable) else variable


class Adamax(keras.optimizers.Adamax):
  """`keras.optimizers.Adamax` with a fused update that applies gradients as given.

  Keras sums the gradients over replicas inside `apply` (`_all_reduce_sum_gradients`); the
  training step needs the summed gradients before the update (finiteness check, gradient norm),
  so it reduces them itself and this class skips the second reduction. Use it only where the
  caller has reduced the gradients already (`train_step.make_train_step`) or runs one replica.
  """

  def _all_reduce_sum_gradients(self, grads_and_vars):
    return list(grads_and_vars)

  def update_step(self, gradient, variable, learning_rate):
    """Applies one Adamax step to `variable` with `ResourceApplyAdaMax`."""
    dtype = variable.dtype
    index = self._get_variable_index(variable)
    beta_1 = tf.cast(self.beta_1, dtype)
    beta_1_power = tf.pow(beta_1, tf.cast(self.iterations + 1, dtype))
    tf.raw_ops.ResourceApplyAdaMax(
      var=_resource(variable).handle,
      m=_resource(self._m[index]).handle,
      v=_resource(self._u[index]).handle,
      beta1_power=beta_1_power,
      lr=tf.cast(learning_rate, dtype),
      beta1=beta_1,
      beta2=tf.cast(self.beta_2, dtype),
      epsilon=tf.cast(self.epsilon, dtype),
      grad=tf.cast(gradient, dtype),
    )
