"""The distributed training step: per-replica loss and gradient, one all-reduce, a guarded update.

```
per replica (optionally XLA-compiled; nothing in it assigns or synchronises):
  nll   = -elbo(images, noise)                        # [per-replica batch], nats, training=True
  loss  = compute_average_loss(nll, global_batch)     # SUM over replicas = global mean
  grads = d loss / d weights
  bn    = running statistics after this batch         # recorded, not assigned
all_reduce: SUM(loss, grads), MEAN(bn)                # skipped with one replica (the identity)
cross-replica, only if the step is safe:  optimizer.apply(grads); assign bn
  (optim.Adamax: `apply_if(safe, grads)`, an update that is an exact no-op when not safe,
   and bn <- where(safe, new, old): no tf.cond over every variable; other optimizers: tf.cond)
safe = finite loss, finite gradient norm, finite batch-norm statistics, and an update that
       cannot overflow (`optimizer.update_is_safe()`, checked before the in-place kernel)
```
A skipped step is reported with its cause (`SKIP_REASONS[skip_reason]`) and counted.

float16 (`--precision=float16`) scales the loss by a `precision.DynamicLossScale` before the
gradient and divides the gradients by the same power of 2 before the all-reduce:
```
grads = d(loss * scale)/dw / scale                 (in the replica function, XLA or not)
non-finite gradient, finite loss, scale > min  ->  skip_reason LOSS_SCALE_OVERFLOW, scale / 2
applied                                         ->  after growth_steps in a row, scale * 2
```
`make_train_loop` runs several steps in one `tf.function` call (`--steps_per_loop`).

Batch-norm running statistics are recorded by `nn.collect_batch_norm_updates` rather than
assigned in the forward pass. That keeps the replica function free of `merge_call` (so
`jit_compile` works on CPU devices as well as GPUs), keeps `tf.recompute_grad`'s recomputation
from updating them a second time, and lets a skipped (non-finite) step leave no trace. The
all-reduced MEAN equals what MirroredStrategy's MEAN-aggregated assignment did.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import keras
import tensorflow as tf

from tf_denseflow import xla
from tf_denseflow.model import DenseFlow
from tf_denseflow.nn.layers import collect_batch_norm_updates
from tf_denseflow.precision import DynamicLossScale

__all__ = [
  'LOSS_SCALE_OVERFLOW',
  'OUTPUT_DTYPES',
  'SKIP_REASONS',
  'make_train_loop',
  'make_train_step',
  'replica_loss_and_grads',
]

# What made a step skip its update, by the `skip_reason` code the step returns (0: applied).
SKIP_REASONS = (
  None,
  'non-finite loss',
  'non-finite gradient',
  'non-finite batch-norm statistics',
  'update that would overflow float32 (learning rate too large)',
  'float16 gradient overflow (loss scale halved)',
)
# The skip reason of a float16 overflow that the loss scale absorbs (a normal event while the
# dynamic loss scale finds its level, not a sign of divergence).
LOSS_SCALE_OVERFLOW = SKIP_REASONS.index('float16 gradient overflow (loss scale halved)')
# What a step returns.
OUTPUT_DTYPES = {
  'loss': tf.float32,
  'grad_norm': tf.float32,
  'finite': tf.bool,
  'skip_reason': tf.int32,
  'learning_rate': tf.float32,
}


def replica_loss_and_grads(
  model: DenseFlow,
  variables: Sequence[tf.Variable],
  nll_fn: Callable[[], tf.Tensor],
  global_batch: int,
  loss_scale: Optional[tf.Tensor] = None,
):
  """Loss, gradients and the batch-norm statistics after this batch, assigning nothing.

  Args:
    model: the flow (its `batch_norm_layers` give the order of the statistics).
    variables: the variables to differentiate.
    nll_fn: computes the per-example negative ELBO `[B]` (with `training=True`).
    global_batch: examples in the global batch (the loss is their mean over all replicas).
    loss_scale: float32 scalar (a power of 2) or None: differentiate `loss * loss_scale` and
      divide the gradients by it (float16 training).

  Returns:
    `(loss, grads, bn_values)`: `loss` float32 scalar (unscaled); `grads` float32, one per
    variable, unscaled, zeros for unconnected variables (Inf/NaN where float16 overflowed);
    `bn_values` is `[mean_0, variance_0, mean_1, ...]` in `model.batch_norm_layers` order.
  """
  with collect_batch_norm_updates() as updates:
    with tf.GradientTape() as tape:
      nll = nll_fn()
      loss = tf.nn.compute_average_loss(nll, global_batch_size=global_batch)
      scaled = loss if loss_scale is None else loss * loss_scale
    updates.freeze()  # tf.recompute_grad replays the forward pass during tape.gradient
    grads = tape.gradient(scaled, variables)
  grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
  if loss_scale is not None:
    inverse = tf.math.reciprocal(loss_scale)  # exact: the scale is a power of 2
    grads = [g * inverse for g in grads]
  return loss, grads, updates.new_values(model.batch_norm_layers)


def make_train_step(
  strategy: tf.distribute.Strategy,
  model: DenseFlow,
  optimizer: keras.optimizers.Optimizer,
  variables: Sequence[tf.Variable],
  noise_fn: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], Any],
  nll_fn: Callable[[tf.Tensor, Any], tf.Tensor],
  global_batch: int,
  step: tf.Variable,
  nonfinite_total: tf.Variable,
  seed_fn: Callable[[tf.Variable], tf.Tensor],
  learning_rate_fn: Callable[[tf.Variable], tf.Tensor],
  jit_compile: bool = False,
  loss_scale: Optional[DynamicLossScale] = None,
) -> Callable:
  """Builds `train_step(iterator) -> {loss, grad_norm, finite, skip_reason, learning_rate}`.

  Args:
    strategy: the distribution strategy (variables created in its scope).
    model: the flow.
    optimizer: applies summed gradients as given (no second all-reduce); its
      `update_is_safe()` (`optim.Adamax`), if it has one, guards the update itself, and its
      `apply_if(condition, grads, variables)`, if it has one, replaces the `tf.cond` around
      the update.
    variables: the trainable variables.
    noise_fn: `noise_fn(images, seed, replica_id) -> noise` (any nest of tensors): the random
      inputs of the replica's loss, drawn outside the XLA cluster (XLA's stateless generators
      give other numbers than TF's kernels for the same seed).
    nll_fn: `nll_fn(images, noise) -> [B]` negative ELBO in nats (training mode).
    global_batch: examples per step over all replicas.
    step: the global step variable (incremented by every call, skipped or not).
    nonfinite_total: counts the skipped steps.
    seed_fn: the step's stateless seed from `step`.
    learning_rate_fn: the learning rate at `step` (reported).
    jit_compile: XLA-compile the per-replica loss-and-gradient function (`xla.jit`: traced
      under `xla.compatible()`, so the model takes its XLA-compilable paths).
    loss_scale: a `precision.DynamicLossScale` (float16 training; made in the strategy's scope)
      or None. Every step scales the loss by it, and updates it after the verdict: an overflow
      (non-finite gradient with a finite loss while the scale is above its minimum) is skipped
      with `skip_reason == LOSS_SCALE_OVERFLOW` and halves it.

  Returns:
    A `tf.function` returning `loss` (the global mean, nats), `grad_norm`, `finite` (the update
    was applied), `skip_reason` (index into `SKIP_REASONS`, 0 if applied) and `learning_rate`.
  """
  bn_variables: List[tf.Variable] = []
  for layer in model.batch_norm_layers:
    for v in (layer.moving_mean, layer.moving_variance):
      # strategy.extended.update needs the tf.Variable (a MirroredVariable) inside Keras's.
      bn_variables.append(v.value if isinstance(v, keras.Variable) else v)

  def loss_and_grads(images, noise, scale):
    return replica_loss_and_grads(
      model, variables, lambda: nll_fn(images, noise), global_batch, scale
    )

  if jit_compile:
    # XLA on the per-replica math only (ecosystem.md 5.1); the update stays outside.
    loss_and_grads = xla.jit(loss_and_grads)

  masked_update = callable(getattr(optimizer, 'apply_if', None))

  def apply_if_finite(distribution, grads, bn_values, finite):
    # In cross-replica context (the optimizer synchronises; as keras LossScaleOptimizer does);
    # `finite` is the same on every replica.
    if masked_update:
      # optim.Adamax: the update runs either way and is an exact no-op when skipped; no
      # tf.cond over every variable (`Adamax.apply_if`; the cond's bookkeeping was ~18% of
      # `small`'s tracing time, docs/benchmarks.md 5.4).
      # One verdict for every replica and device, the first replica's (as the tf.cond had).
      verdict = distribution.experimental_local_results(finite)[0]
      distribution.extended.call_for_each_replica(
        lambda g: optimizer.apply_if(verdict, g, variables), args=(grads,)
      )
      for var, value in zip(bn_variables, bn_values):
        distribution.extended.update(
          var, lambda v, x: v.assign(tf.where(verdict, x, v)), args=(value,), group=False
        )
      return

    def apply():
      distribution.extended.call_for_each_replica(
        lambda g: optimizer.apply(g, variables), args=(grads,)
      )
      for var, value in zip(bn_variables, bn_values):
        distribution.extended.update(var, lambda v, x: v.assign(x), args=(value,), group=False)
      return tf.constant(True)

    return tf.cond(
      distribution.experimental_local_results(finite)[0], apply, lambda: tf.constant(False)
    )

  update_is_safe = getattr(optimizer, 'update_is_safe', None)

  def replica_step(images, seed):
    ctx = tf.distribute.get_replica_context()
    noise = noise_fn(images, seed, ctx.replica_id_in_sync_group)
    scale = None if loss_scale is None else tf.convert_to_tensor(loss_scale.scale)
    loss, grads, bn_values = loss_and_grads(images, noise, scale)
    if ctx.num_replicas_in_sync > 1:
      # One replica: the SUM and MEAN are the values themselves, and the all-reduce would only
      # add graph ops per gradient (its tf.custom_gradient wrapper makes an Identity for each).
      loss, grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [loss, grads])
      if bn_values:
        bn_values = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, bn_values)
    # A NaN or Inf in any gradient makes the global norm non-finite: one check instead of one
    # per variable. (A norm that overflows float32, > 1.8e19, also counts as non-finite; so every
    # applied gradient entry is below 1.8e19, which the update bound relies on.)
    grad_norm = tf.linalg.global_norm(grads)
    checks = [
      tf.math.is_finite(loss),
      tf.math.is_finite(grad_norm),
      tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in bn_values])
      if bn_values
      else tf.constant(True),
      # The fused kernel writes in place: the update is judged before it runs (optim.py).
      update_is_safe() if update_is_safe is not None else tf.constant(True),
    ]
    skip_reason = tf.constant(0, tf.int32)
    for code in reversed(range(len(checks))):  # the first failing check names the cause
      skip_reason = tf.where(checks[code], skip_reason, tf.constant(code + 1, tf.int32))
    if loss_scale is not None:
      overflow = tf.equal(skip_reason, SKIP_REASONS.index('non-finite gradient'))
      overflow &= loss_scale.can_shrink()
      skip_reason = tf.where(overflow, tf.constant(LOSS_SCALE_OVERFLOW, tf.int32), skip_reason)
    finite = tf.equal(skip_reason, 0)
    ctx.merge_call(apply_if_finite, args=(grads, bn_values, finite))
    return loss, grad_norm, finite, skip_reason

  @tf.function(autograph=False)
  def train_step(iterator) -> Dict[str, tf.Tensor]:
    seed = seed_fn(step)
    learning_rate = learning_rate_fn(step)
    outputs = strategy.run(replica_step, args=(next(iterator), seed))
    first = strategy.experimental_local_results
    loss, grad_norm, finite, skip_reason = [first(x)[0] for x in outputs]
    nonfinite_total.assign_add(tf.cast(tf.logical_not(finite), nonfinite_total.dtype))
    if loss_scale is not None:
      loss_scale.update(finite, tf.equal(skip_reason, LOSS_SCALE_OVERFLOW))
    step.assign_add(1)
    return {
      'loss': loss,
      'grad_norm': grad_norm,
      'finite': finite,
      'skip_reason': skip_reason,
      'learning_rate': tf.cast(learning_rate, tf.float32),
    }

  return train_step


def make_train_loop(train_step: Callable) -> Callable:
  """Builds `train_loop(iterator, num_steps)`: `num_steps` steps in one `tf.function` call.

  Orbit's inner loop (`orbit.utils.create_tf_while_loop_fn`): a `tf.while_loop` over the step,
  so the host syncs once per loop, not once per step. Every step runs exactly as on its own (its
  own seed, learning rate and non-finite guard, from the step variable), so `k` loops of `n`
  steps give the weights of `k * n` single steps.

  Args:
    train_step: a `make_train_step` function.

  Returns:
    A `tf.function` taking the iterator and `num_steps` (int32 scalar tensor, >= 1: one trace
    for every count) and returning the step outputs stacked, each `[num_steps]`, in step order.
  """
  step_fn = train_step.python_function

  @tf.function(autograph=False)
  def train_loop(iterator, num_steps) -> Dict[str, tf.Tensor]:
    arrays = {k: tf.TensorArray(dtype, size=num_steps) for k, dtype in OUTPUT_DTYPES.items()}

    def body(i, arrays):
      outputs = step_fn(iterator)
      return i + 1, {k: arrays[k].write(i, outputs[k]) for k in arrays}

    _, arrays = tf.while_loop(lambda i, _: i < num_steps, body, (tf.constant(0), arrays))
    return {k: a.stack() for k, a in arrays.items()}

  return train_loop
