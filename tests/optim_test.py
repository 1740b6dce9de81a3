"""Tests for tf_denseflow.optim.Adamax: the fused update equals Keras's Adamax; its guard.

The update shares its kernel's scalars between variables (`Adamax._distributed_tf_update_step`):
it must equal the previous per-variable update (and `Adamax.update_step`) bit for bit, and cost
one op per variable.
"""

import collections

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_denseflow import cluster, optim
from tf_denseflow.optim import Adamax


class _KerasLoopAdamax(Adamax):
  """`Adamax` through Keras's loop: `update_step`, with its own scalars, for every variable."""

  def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
    return keras.optimizers.Adamax._distributed_tf_update_step(
      self, distribution, grads_and_vars, learning_rate
    )


class _PerVariableAdamax(_KerasLoopAdamax):
  """The update before session 6: Keras's loop, every variable computing its kernel's scalars.

  `update_step` as it was (kept here, independent of `Adamax.kernel_scalars`).
  """

  def update_step(self, gradient, variable, learning_rate):
    dtype = variable.dtype
    index = self._get_variable_index(variable)
    beta_1 = tf.cast(self.beta_1, dtype)
    beta_1_power = tf.pow(beta_1, tf.cast(self.iterations + 1, dtype))
    tf.raw_ops.ResourceApplyAdaMax(
      var=optim._resource(variable).handle,
      m=optim._resource(self._m[index]).handle,
      v=optim._resource(self._u[index]).handle,
      beta1_power=beta_1_power,
      lr=tf.cast(learning_rate, dtype),
      beta1=beta_1,
      beta2=tf.cast(self.beta_2, dtype),
      epsilon=tf.cast(self.epsilon, dtype),
      grad=tf.cast(gradient, dtype),
    )


def _strategy(kind):
  if kind == 'default':
    return tf.distribute.get_strategy()
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  return cluster.mirrored_strategy(devices[: 1 if kind == 'mirrored_1' else 2])


def _graph_op_counts(concrete_function):
  """Op types of a traced function's graph and of every function in its library."""
  graph = concrete_function.graph
  counts = collections.Counter(op.type for op in graph.get_operations())
  for function in graph.as_graph_def().library.function:
    counts.update(node.op for node in function.node_def)
  return counts


def _run(
  optimizer_cls, strategy, steps=4, learning_rate=1e-2, dtypes=None, conditions=None, masked=False
):
  """Adamax steps on three variables; with `conditions`, only the steps whose condition is True.

  `masked`: every step through `apply_if(condition, ...)`, the skipped steps' gradients poisoned
  with NaN and Inf entries; otherwise `apply`, and a skipped step is not run at all.
  """
  rng = np.random.default_rng(0)
  shapes = [(3, 4), (5,), (2, 2, 3)]
  dtypes = dtypes or [np.float32] * len(shapes)
  inits = [rng.normal(size=s).astype(d) for s, d in zip(shapes, dtypes)]
  grads = [[rng.normal(size=s).astype(d) for s, d in zip(shapes, dtypes)] for _ in range(steps)]
  conditions = conditions or [True] * steps
  with strategy.scope():
    variables = [keras.Variable(x, dtype=x.dtype.name) for x in inits]
    optimizer = optimizer_cls(learning_rate=learning_rate, epsilon=1e-7)
    optimizer.build(variables)

  @tf.function
  def step(g, condition):
    def replica_fn(g, condition):
      # Each replica holds the (already summed) gradient; Adamax applies it as given.
      if masked:
        optimizer.apply_if(condition, g, variables)
      else:
        optimizer.apply(g, variables)

    strategy.run(replica_fn, args=(g, condition))

  for g, condition in zip(grads, conditions):
    if not condition:
      if not masked:
        continue
      g = [x.copy() for x in g]
      g[0].flat[0], g[1].flat[1], g[2].flat[2] = np.nan, np.inf, -np.inf
    step([tf.constant(x) for x in g], tf.constant(condition))
  slots = [v.numpy() for v in optimizer._m] + [v.numpy() for v in optimizer._u]
  op_types = set(
    _graph_op_counts(
      step.get_concrete_function([tf.constant(x) for x in grads[0]], tf.constant(True))
    )
  )
  return [v.numpy() for v in variables], slots, int(optimizer.iterations.numpy()), op_types


def _mixed_run(optimizer_cls, strategy, **kwargs):
  """`_run` with float32 and float64 variables and a schedule's learning rate."""
  schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=1, decay_rate=0.75)
  dtypes = [np.float32, np.float64, np.float32]
  return _run(optimizer_cls, _strategy(strategy), learning_rate=schedule, dtypes=dtypes, **kwargs)


def _update_op_counts(num_variables, strategy):
  """Op types of one traced `apply` of `num_variables` gradients (learning rate: a callable)."""
  with strategy.scope():
    variables = [keras.Variable(np.ones([2], np.float32)) for _ in range(num_variables)]
    optimizer = Adamax(learning_rate=lambda: tf.constant(1e-3) * 2.0)
    optimizer.build(variables)

  @tf.function(autograph=False)
  def step(grads):
    strategy.run(lambda g: optimizer.apply(g, variables), args=(grads,))

  return _graph_op_counts(step.get_concrete_function([tf.ones([2])] * num_variables))


class AdamaxTest(tf.test.TestCase, parameterized.TestCase):
  def test_fused_update_equals_keras_adamax(self):
    strategy = tf.distribute.get_strategy()
    want, want_slots, want_iterations, want_ops = _run(keras.optimizers.Adamax, strategy)
    got, got_slots, got_iterations, got_ops = _run(Adamax, strategy)
    self.assertEqual(got_iterations, want_iterations)
    self.assertIn('ResourceApplyAdaMax', got_ops)
    self.assertNotIn('ResourceApplyAdaMax', want_ops)
    for a, b in zip(got + got_slots, want + want_slots):
      self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)

  def test_fused_update_on_two_replicas_applies_gradients_once(self):
    # Keras's Adamax would sum the two replicas' gradients (2x); this one applies them as given,
    # so 2 replicas holding the same summed gradient give the 1-device result.
    devices = [d.name for d in tf.config.list_logical_devices('CPU')][:2]
    self.assertLen(devices, 2)
    want, want_slots, _, _ = _run(keras.optimizers.Adamax, tf.distribute.get_strategy())
    got, got_slots, _, _ = _run(Adamax, cluster.mirrored_strategy(devices))
    for a, b in zip(got + got_slots, want + want_slots):
      self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)

  @parameterized.named_parameters(
    ('default_strategy', 'default'),
    ('one_mirrored_replica', 'mirrored_1'),
    ('two_mirrored_replicas', 'mirrored_2'),
  )
  def test_shared_scalars_equal_the_per_variable_update_bit_for_bit(self, strategy):
    # Scalars made once per device and dtype (here float32 and float64 variables and a
    # schedule's learning rate) give exactly the values of every variable computing its own.
    want, want_slots, want_iterations, _ = _mixed_run(_PerVariableAdamax, strategy, steps=5)
    for cls in (Adamax, _KerasLoopAdamax):  # shared scalars; today's update_step per variable
      got, got_slots, got_iterations, got_ops = _mixed_run(cls, strategy, steps=5)
      self.assertEqual(got_iterations, want_iterations)
      self.assertEqual(got_iterations, 5)
      self.assertIn('ResourceApplyAdaMax', got_ops)
      for a, b in zip(got + got_slots, want + want_slots, strict=True):
        self.assertEqual(a.dtype, b.dtype)
        self.assertAllEqual(a, b)  # bit for bit, not close

  @parameterized.named_parameters(
    ('default_strategy', 'default'),
    ('one_mirrored_replica', 'mirrored_1'),
    ('two_mirrored_replicas', 'mirrored_2'),
  )
  def test_apply_if_is_apply_or_changes_nothing_bit_for_bit(self, strategy):
    # The training step's update without a tf.cond: apply_if(True) is apply, and
    # apply_if(False) with NaN and Inf in the gradients leaves every weight, slot and the
    # iteration count (so the next bias correction) exactly as they were. float32 and float64
    # variables (each dtype has its own scalars), a schedule's learning rate.
    conditions = [True, False, False, True, False, True]
    runs = [
      _mixed_run(Adamax, strategy, steps=6, conditions=conditions, masked=masked)
      for masked in (False, True)
    ]
    (want, want_slots, want_iterations, _), (got, got_slots, got_iterations, got_ops) = runs
    self.assertEqual((got_iterations, want_iterations), (3, 3))
    self.assertIn('MulNoNan', got_ops)
    self.assertNotIn('If', got_ops)
    self.assertNotIn('StatelessIf', got_ops)
    for a, b in zip(got + got_slots, want + want_slots, strict=True):
      self.assertEqual(a.dtype, b.dtype)
      self.assertAllEqual(a, b)  # bit for bit

  @parameterized.named_parameters(
    ('clipnorm', {'clipnorm': 1.0}, '`clipnorm`'),
    ('global_clipnorm', {'global_clipnorm': 1.0}, '`global_clipnorm`'),
    ('ema', {'use_ema': True}, 'use_ema'),
    ('accumulation', {'gradient_accumulation_steps': 2}, 'accumulation'),
  )
  def test_apply_if_refuses_what_it_does_not_do(self, kwargs, message):
    variables = [keras.Variable(np.ones([2], np.float32))]
    optimizer = Adamax(learning_rate=0.1, **kwargs)
    optimizer.build(variables)
    with self.assertRaisesRegex(ValueError, message):
      optimizer.apply_if(tf.constant(True), [tf.ones([2])], variables)

  def test_apply_if_needs_a_built_optimizer(self):
    variables = [keras.Variable(np.ones([2], np.float32))]
    with self.assertRaisesRegex(ValueError, 'needs a built optimizer'):
      Adamax(learning_rate=0.1).apply_if(tf.constant(True), [tf.ones([2])], variables)

  @parameterized.named_parameters(
    ('default_strategy', 'default'),
    ('one_mirrored_replica', 'mirrored_1'),
  )
  def test_update_costs_one_op_per_variable(self, strategy):
    # Beyond its captured handles and gradient argument (Placeholders: the variable, m, u and
    # the gradient), a variable adds only its ResourceApplyAdaMax to the traced update; with
    # the scalars made per variable (`update_step`) it added nine more: a read of iterations,
    # +1, two casts, pow and four constants (ten with a learning rate held in a variable).
    small = _update_op_counts(4, _strategy(strategy))
    large = _update_op_counts(12, _strategy(strategy))
    growth = large - small
    placeholders = growth.pop('Placeholder', 0)
    self.assertEqual(dict(growth), {'ResourceApplyAdaMax': 8}, 'ops added by 8 more variables')
    self.assertLessEqual(placeholders, 4 * 8)

  def test_checkpoint_loads_into_keras_adamax(self):
    variables = [keras.Variable(np.ones([3], np.float32))]
    fused = Adamax(learning_rate=0.1)
    fused.build(variables)
    fused.apply([tf.constant([1.0, -2.0, 3.0])], variables)
    path = tf.train.Checkpoint(optimizer=fused, v=variables[0]).save(self.get_temp_dir() + '/ck')
    restored_vars = [keras.Variable(np.zeros([3], np.float32))]
    plain = keras.optimizers.Adamax(learning_rate=0.1)
    plain.build(restored_vars)
    tf.train.Checkpoint(optimizer=plain, v=restored_vars[0]).restore(path).assert_consumed()
    self.assertAllClose(plain._m[0].numpy(), fused._m[0].numpy())
    self.assertAllClose(plain._u[0].numpy(), fused._u[0].numpy())
    self.assertEqual(int(plain.iterations.numpy()), 1)

  @parameterized.named_parameters(
    ('official_betas', 0.9, 0.999, 1e-8),
    ('tiny_epsilon', 0.9, 0.999, 1.2e-38),
    ('beta_1_above_beta_2', 0.99, 0.5, 1e-7),
    ('no_momentum', 0.0, 0.999, 1e-7),
  )
  def test_update_bound_holds_for_wild_gradients(self, beta_1, beta_2, epsilon):
    # Gradient entries from 1e-30 to 1e18 (a finite global norm), zeros and sign flips: every
    # applied update stays below the bound computed before it.
    rng = np.random.default_rng(0)
    variable = keras.Variable(rng.normal(size=[64]).astype(np.float32))
    optimizer = Adamax(learning_rate=0.5, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
    optimizer.build([variable])
    for step in range(40):
      scale = 10.0 ** rng.uniform(-30, 18, size=[64])
      grad = (rng.choice([-1.0, 0.0, 1.0], size=[64]) * scale).astype(np.float32)
      if step % 7 == 3:
        grad[:] = 0.0
      self.assertTrue(np.isfinite(tf.linalg.global_norm([grad]).numpy()))
      bound = float(optimizer.update_bound())
      self.assertTrue(bool(optimizer.update_is_safe()))
      before = variable.numpy()
      optimizer.apply([tf.constant(grad)], [variable])
      delta = np.abs(variable.numpy().astype(np.float64) - before)
      self.assertTrue(np.all(np.isfinite(variable.numpy())))
      self.assertLessEqual(delta.max(), bound * (1 + 1e-5), f'step {step}')

  def test_update_that_would_overflow_is_refused_before_the_kernel_runs(self):
    # lr / (1 - beta_1) overflows float32 at lr = 1e38: the kernel then writes Inf, and NaN
    # (Inf * 0) where the gradient entry is zero. The guard says so before the in-place update.
    for learning_rate, safe in ((1e-3, True), (1e29, True), (1e31, False), (1e38, False)):
      variable = keras.Variable(np.ones([3], np.float32))
      optimizer = Adamax(learning_rate=learning_rate)
      optimizer.build([variable])
      self.assertEqual(bool(optimizer.update_is_safe()), safe, learning_rate)
      if learning_rate == 1e38:
        optimizer.apply([tf.constant([0.0, 1.0, -1.0])], [variable])
        self.assertFalse(np.any(np.isfinite(variable.numpy())))  # what the guard prevents
    self.assertLess(float(Adamax(learning_rate=1e-3).update_bound()), 1.1e-2)

  @parameterized.named_parameters(
    ('zero_epsilon', {'epsilon': 0.0}, '`epsilon` must be >= 1.17'),
    ('denormal_epsilon', {'epsilon': 1e-45}, '`epsilon` must be >= 1.17'),
    ('nan_learning_rate', {'learning_rate': float('nan')}, '`learning_rate` must be finite'),
    ('float32_inf_learning_rate', {'learning_rate': 1e39}, '`learning_rate` must be <='),
    ('beta_1_one', {'beta_1': 1.0}, '`beta_1` must be < 1'),
    ('beta_1_rounds_to_one', {'beta_1': 1 - 1e-9}, '`beta_1` must be < 1 in float32'),
    ('negative_beta_2', {'beta_2': -0.1}, '`beta_2` must be >= 0'),
    ('weight_decay', {'weight_decay': 1e-4}, '`weight_decay` is not supported'),
  )
  def test_constructor_refuses_hyper_parameters_that_break_the_update(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      Adamax(**kwargs)

  def test_update_limit_is_below_half_an_ulp_of_the_float32_maximum(self):
    # A finite weight moved by less than half an ulp of the largest float32 (2**103) stays
    # finite; the limit keeps a margin of 8 for the rounding of the bound itself.
    biggest = np.float32(np.finfo(np.float32).max)
    below, above = np.float32(optim.UPDATE_LIMIT * 4), np.float32(optim.UPDATE_LIMIT * 16)
    with np.errstate(over='ignore'):
      self.assertTrue(np.isfinite(biggest + below) and np.isfinite(-biggest - below))
      self.assertFalse(np.isfinite(biggest + above))


if __name__ == '__main__':
  tf.test.main()
