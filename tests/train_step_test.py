"""Tests for tf_denseflow.train_step on a stub model: values and the ops each variable costs.

The stub has `n` weight vectors and a loss that reads each once, so everything else in the traced
step (the all-reduce, the global norm, the guard, the update) can be counted per variable: the
graph of a real model has ~3,400 variables (DenseFlow-74-10), and every op per variable costs
tracing and instantiation memory (docs/benchmarks.md section 4).
"""

import collections

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from optim_test import _PerVariableAdamax, _strategy  # the pre-session-6 update, strategies

from tf_denseflow import train_step as train_step_lib
from tf_denseflow.optim import Adamax

_BATCH = 4
_SCOPE = 'stub_nll'


class _StubModel:
  """What `make_train_step` reads of the model: no batch-norm layers."""

  batch_norm_layers = ()


def _noise(seed):
  return tf.random.stateless_normal([_BATCH], seed)


def _nll(variables, images, noise):
  """`[B]`: each example's mean pixel times the sum of squared weights, plus noise."""
  with tf.name_scope(_SCOPE):
    x = tf.reduce_mean(tf.cast(images, tf.float32), axis=1)
    return x * tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables]) + noise


def _images():
  rng = np.random.default_rng(0)
  return tf.constant(rng.uniform(0.0, 1.0, [3 * _BATCH, 5]).astype(np.float32))


class _Stub:
  """`num_variables` weight vectors, their Adamax, and the step's counters, in `strategy`."""

  def __init__(self, strategy, num_variables, optimizer_cls=Adamax):
    rng = np.random.default_rng(1)
    with strategy.scope():
      self.variables = [
        keras.Variable(rng.normal(size=[3]).astype(np.float32)) for _ in range(num_variables)
      ]
      self.optimizer = optimizer_cls(learning_rate=1e-2)
      self.optimizer.build(self.variables)
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False)

  def train_step(self, strategy):
    return train_step_lib.make_train_step(
      strategy,
      _StubModel(),
      self.optimizer,
      self.variables,
      lambda images, seed, replica: _noise(seed),
      lambda images, noise: _nll(self.variables, images, noise),
      _BATCH,
      self.step,
      self.skipped,
      seed_fn=lambda s: tf.stack([tf.constant(7, tf.int64), s]),
      learning_rate_fn=lambda s: tf.constant(1e-2),
    )


def _iterator(strategy):
  dataset = tf.data.Dataset.from_tensor_slices(_images()).batch(_BATCH).repeat()
  if strategy is not tf.distribute.get_strategy():
    dataset = strategy.experimental_distribute_dataset(dataset)
  return iter(dataset)


def _step_op_counts(strategy, num_variables):
  """Op types of the traced step outside the stub's loss and its gradient, with the library's."""
  stub = _Stub(strategy, num_variables)
  concrete = stub.train_step(strategy).get_concrete_function(_iterator(strategy))
  graph = concrete.graph
  counts = collections.Counter(
    op.type
    for op in graph.get_operations()
    if not op.name.startswith((_SCOPE + '/', 'gradient_tape/'))
  )
  for function in graph.as_graph_def().library.function:
    counts.update(node.op for node in function.node_def)
  return counts


class TrainStepTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ('default_strategy', 'default'), ('one_mirrored_replica', 'mirrored_1')
  )
  def test_step_costs_three_ops_per_variable(self, kind):
    # Beyond its captured handles (Placeholders: m and u, and the variable unless the stub's
    # loss captured it first), a variable costs the step its L2Loss in the global norm, the
    # MulNoNan that zeroes its gradient in a skipped step and its ResourceApplyAdaMax. Before
    # session 6 also ten ops of scalars in its update and an Identity in the one-replica
    # all-reduce; before session 10 the tf.cond around the update gave it an input of the If
    # op and a dummy Placeholder in the cond's other branch for each handle and gradient.
    small, large = _step_op_counts(_strategy(kind), 4), _step_op_counts(_strategy(kind), 12)
    growth = large - small
    placeholders = growth.pop('Placeholder', 0)
    self.assertEqual(
      dict(growth),
      {'L2Loss': 8, 'MulNoNan': 8, 'ResourceApplyAdaMax': 8},
      'ops added by 8 more variables',
    )
    self.assertLessEqual(placeholders, 3 * 8)
    self.assertFalse({'If', 'StatelessIf'} & set(large), 'no tf.cond around the update')

  def test_one_replica_step_equals_the_per_variable_reference_bit_for_bit(self):
    # The step without the one-replica all-reduce and with shared kernel scalars gives exactly
    # the loss, gradient norm, weights and slots of tape + global_norm + the per-variable update.
    strategy = _strategy('mirrored_1')
    stub = _Stub(strategy, 5)
    train_step = stub.train_step(strategy)
    iterator = _iterator(strategy)
    reference = _Stub(tf.distribute.get_strategy(), 5, _PerVariableAdamax)

    @tf.function(autograph=False)
    def reference_step(images, seed):
      with tf.GradientTape() as tape:
        nll = _nll(reference.variables, images, _noise(seed))
        loss = tf.nn.compute_average_loss(nll, global_batch_size=_BATCH)
      grads = tape.gradient(loss, reference.variables)
      reference.optimizer.apply(grads, reference.variables)
      return loss, tf.linalg.global_norm(grads)

    images = _images()
    for i in range(3):
      got = train_step(iterator)
      self.assertTrue(bool(got['finite']))
      seed = tf.constant([7, i], tf.int64)
      loss, grad_norm = reference_step(images[i * _BATCH : (i + 1) * _BATCH], seed)
      self.assertEqual(got['loss'].numpy(), loss.numpy())
      self.assertEqual(got['grad_norm'].numpy(), grad_norm.numpy())
    self.assertEqual(int(stub.optimizer.iterations.numpy()), 3)
    got = stub.variables + stub.optimizer._m + stub.optimizer._u
    want = reference.variables + reference.optimizer._m + reference.optimizer._u
    for a, b in zip(got, want, strict=True):
      self.assertAllEqual(a.numpy(), b.numpy())


if __name__ == '__main__':
  tf.test.main()
