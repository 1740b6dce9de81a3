"""Tests for tf_denseflow.nn.gradient_rules: custom gradients that keep no traced graph alive.

`tf.custom_gradient` in a graph registers a gradient function per call in TF's process-wide
registry, closing over the call's tensors, so every graph that traced one stayed alive.
"""

import gc
import weakref

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops  # private (BUILD.md): the gradient registry

import tf_denseflow as tdf
from tf_denseflow import train_step
from tf_denseflow.nn import conv3x3, gradient_rules, recompute


def _registry_size():
  return len(ops._gradient_registry.list())


_SQUARE_SUM = gradient_rules.GradientRule(
  'TestSquareSum', lambda a, b: a * a + b, lambda inputs, dy: (2.0 * inputs[0] * dy, dy)
)


def _conv_and_concat(x, kernel, b):
  y = conv3x3.conv3x3_same(x, kernel)  # [2, 5, 5, 4]
  flat = tf.reshape(y, [-1, 4])
  with recompute.expecting_gradient(True):
    z = recompute.matmul_of_concatenation([flat, tf.reshape(x, [-1, 3])], b)
  return tf.reduce_sum(tf.sin(z))


def _reference(x, kernel, b):
  y = tf.nn.conv2d(x, kernel, 1, 'SAME')
  z = tf.matmul(tf.concat([tf.reshape(y, [-1, 4]), tf.reshape(x, [-1, 3])], axis=1), b)
  return tf.reduce_sum(tf.sin(z))


class GradientRuleTest(tf.test.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.args = [
      tf.constant(rng.normal(size=s), tf.float32) for s in ([2, 5, 5, 3], [3, 3, 3, 4], [7, 2])
    ]

  def _expected(self):
    with tf.GradientTape() as tape:
      tape.watch(self.args)
      loss = _reference(*self.args)
    return loss, tape.gradient(loss, self.args)

  def test_gradients_on_every_path_equal_the_library_ops(self):
    want_loss, want = self._expected()

    def taped(*args):
      with tf.GradientTape() as tape:
        tape.watch(args)
        loss = _conv_and_concat(*args)
      return loss, tape.gradient(loss, args)

    def symbolic(*args):  # no tape: the registered gradient of the IdentityN
      loss = _conv_and_concat(*args)
      return loss, tf.gradients(loss, args)

    for name, fn in (
      ('eager tape', taped),
      ('tape in a function', tf.function(taped, autograph=False)),
      ('tf.gradients in a function', tf.function(symbolic, autograph=False)),
    ):
      with self.subTest(name):
        loss, grads = fn(*self.args)
        self.assertAllClose(loss, want_loss, rtol=1e-5)
        for g, w in zip(grads, want):
          self.assertAllClose(g, w, rtol=1e-4, atol=1e-4)

  def test_a_rule_equals_its_formula_in_both_gradient_paths(self):
    a, b = tf.constant([1.0, -2.0]), tf.constant([3.0, 4.0])

    @tf.function(autograph=False)
    def both(a, b):
      with tf.GradientTape() as tape:
        tape.watch([a, b])
        y = _SQUARE_SUM(a, b)
      return y, tape.gradient(y, [a, b], output_gradients=[tf.ones(2)]), tf.gradients(y, [a, b])

    y, taped, symbolic = both(a, b)
    self.assertAllEqual(y, [4.0, 8.0])
    for grads in (taped, symbolic):
      self.assertAllEqual(grads[0], [2.0, -4.0])
      self.assertAllEqual(grads[1], [1.0, 1.0])

  def test_a_second_rule_of_the_same_name_is_refused(self):
    with self.assertRaises(KeyError):
      gradient_rules.GradientRule('TestSquareSum', tf.identity, lambda inputs, dy: (dy,))

  def test_tracing_registers_nothing_and_the_graph_is_freed(self):
    before = _registry_size()

    def traced():
      fn = tf.function(lambda *args: tf.gradients(_conv_and_concat(*args), args), autograph=False)
      concrete = fn.get_concrete_function(*self.args)
      return fn, weakref.ref(concrete.graph)

    fn, graph = traced()
    self.assertEqual(_registry_size(), before)  # tf.custom_gradient: one entry per call
    self.assertIsNotNone(graph())
    del fn
    gc.collect()
    self.assertIsNone(graph())  # tf.custom_gradient's registry entries kept it alive


class TrainingStepGraphTest(tf.test.TestCase):
  def test_a_dropped_training_step_frees_its_graph(self):
    # The regression: the training step of a model (dense blocks with both custom gradients
    # inlined in the step's own graph: the dequantization's context network) stayed in memory
    # after its function was dropped (~85 MB of graph at `small`).
    config = tdf.DenseFlowConfig.tiny(
      image_shape=(8, 8, 1),
      units_per_block=(2, 1),
      steps_per_unit=(1, 1),
      coupling_channels=(4, 4),
      attention_landmarks=2,
    )
    model = tdf.DenseFlow(config, seed=1)
    images = np.random.default_rng(0).integers(0, 256, [4, 8, 8, 1], dtype=np.uint8)
    model.initialize(images)
    variables = model.trainable_variables
    before = _registry_size()

    def traced():
      def loss_and_grads(x):
        return train_step.replica_loss_and_grads(
          model, variables, lambda: -model.elbo_terms(x, training=True)['total'], 4
        )

      fn = tf.function(loss_and_grads, autograph=False)
      concrete = fn.get_concrete_function(tf.constant(images))
      ops_ = {op.type for op in concrete.graph.get_operations()}
      return fn, weakref.ref(concrete.graph), ops_

    fn, graph, op_types = traced()
    self.assertIn('IdentityN', op_types)  # a custom gradient in the step's own graph
    self.assertEqual(_registry_size(), before)
    del fn
    gc.collect()
    self.assertIsNone(graph())


if __name__ == '__main__':
  tf.test.main()
