"""Tests for tf_denseflow.nn.gradient_rules: custom gradients that keep no traced graph alive.

`tf.custom_gradient` in a graph registers a gradient function per call in TF's process-wide
registry, closing over the call's tensors, so every graph that traced one stayed alive.
"""

import gc
import os
import tempfile
import weakref

import numpy as np
import tensorflow as tf

import tf_denseflow as tdf
from tf_denseflow import kernels, train_step
from tf_denseflow.nn import conv3x3, gradient_rules, recompute

# On purpose not the derivative of its forward (3x it), so a test sees which gradient was used.
_TRIPLE = gradient_rules.GradientRule(
  'TestTriple', tf.sin, lambda inputs, dy: (3.0 * tf.cos(inputs[0]) * dy,)
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


def _gradient_paths(f):
  """`{path: args -> gradients of f(*args) w.r.t. args}` over every way a gradient is taken."""

  def taped(*args):
    with tf.GradientTape() as tape:
      tape.watch(args)
      y = f(*args)
    return tape.gradient(y, args)

  def symbolic(*args):  # no tape: the registered gradient of the IdentityN
    return tf.gradients(f(*args), args)

  def around_a_function(*args):  # the function's own forward/backward pair
    with tf.GradientTape() as tape:
      tape.watch(args)
      y = tf.function(f, autograph=False)(*args)
    return tape.gradient(y, args)

  return {
    'eager tape': taped,
    'tape in a function': tf.function(taped, autograph=False),
    'tf.gradients in a function': tf.function(symbolic, autograph=False),
    'tape around a function': around_a_function,
    'tape in an XLA function': tf.function(taped, autograph=False, jit_compile=True),
  }


def _trace_and_drop(fn, *args):
  """Traces `fn` as a `tf.function`, then drops it: (kept while it lived, freed after, op types)."""
  function = tf.function(fn, autograph=False)
  graph = function.get_concrete_function(*args).graph
  op_types = {op.type for op in graph.get_operations()}
  ref = weakref.ref(graph)
  del graph
  kept = ref() is not None  # the function holds it
  del function
  gc.collect()
  return kept, ref() is None, op_types


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
    self.assertAllClose(_conv_and_concat(*self.args), want_loss, rtol=1e-5)
    for name, fn in _gradient_paths(_conv_and_concat).items():
      with self.subTest(name):
        for g, w in zip(fn(*self.args), want):
          self.assertAllClose(g, w, rtol=1e-4, atol=1e-4)

  def test_every_gradient_path_takes_the_rule(self):
    x = tf.constant([0.1, -0.7, 2.0])
    want = 3.0 * np.cos(x.numpy())

    def forward_mode(x):
      with tf.autodiff.ForwardAccumulator(x, tf.ones_like(x)) as acc:
        y = _TRIPLE(x)
      return [acc.jvp(y)]

    paths = dict(
      _gradient_paths(lambda x: tf.reduce_sum(_TRIPLE(x))),
      **{
        'forward mode': forward_mode,
        'forward mode in a function': tf.function(forward_mode, autograph=False),
      },
    )
    for name, fn in paths.items():
      with self.subTest(name):
        self.assertAllClose(fn(x)[0], want, rtol=1e-6)

  def test_a_saved_model_with_default_options_keeps_the_rule(self):
    class Module(tf.Module):
      @tf.function(input_signature=[tf.TensorSpec([3], tf.float32)], autograph=False)
      def f(self, x):
        return _TRIPLE(x) * 2.0

    x = tf.constant([0.1, 0.2, 0.3])
    path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), 'model')
    tf.saved_model.save(Module(), path)  # traces each registered gradient with op=None
    loaded = tf.saved_model.load(path)
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = loaded.f(x)
    self.assertAllClose(tape.gradient(y, x), 6.0 * np.cos(x.numpy()), rtol=1e-6)

  def test_bad_forwards_and_backwards_are_refused(self):
    variable = tf.Variable([1.0, 2.0])
    reads = gradient_rules.GradientRule('TestReads', lambda a: a * variable, lambda i, dy: (dy,))
    same = gradient_rules.GradientRule('TestSame', lambda a: a, lambda i, dy: (dy,))
    two = gradient_rules.GradientRule('TestTwo', tf.sin, lambda i, dy: (dy, dy))
    x = tf.constant([1.0, 2.0])
    with self.assertRaisesRegex(ValueError, 'read variables'):
      reads(x)
    with self.assertRaisesRegex(ValueError, 'returned one of its inputs'):
      same(x)
    with self.assertRaisesRegex(ValueError, '2 gradients for 1 inputs'):
      tf.function(lambda x: tf.gradients(two(x), x), autograph=False)(x)

  def test_tracing_keeps_no_graph_alive(self):
    kept, freed, _ = _trace_and_drop(lambda *a: tf.gradients(_conv_and_concat(*a), a), *self.args)
    self.assertTrue(kept)
    self.assertTrue(freed)  # tf.custom_gradient's registry entries kept it alive


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

    def loss_and_grads(x):
      return train_step.replica_loss_and_grads(
        model, variables, lambda: -model.elbo_terms(x, training=True)['total'], 4
      )

    with kernels.conv_kernels('cpu'):  # the CPU kernels hold both custom gradients
      _, freed, op_types = _trace_and_drop(loss_and_grads, tf.constant(images))
    self.assertIn('IdentityN', op_types)  # a custom gradient in the step's own graph
    self.assertTrue(freed)


if __name__ == '__main__':
  tf.test.main()
