"""Tests for tf_denseflow.kernels: the 'cpu' and 'library' convolution kernels agree.

Each test forces both kinds and compares values and gradients (float32 tolerances): the
networks' 1x1 and 3x3 convolutions (`nn.Conv`), the invertible 1x1 convolution, and a whole tiny
DenseFlow's ELBO and its gradient with respect to every trainable variable.
"""

import flow_testlib as lib
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_denseflow as tdf
from tf_denseflow import kernels, nn
from tf_denseflow.bijectors import InvertibleConv1x1

# Float32 comparisons: no TF32 matmuls/convolutions on GPUs (benchmarks/gpu_check.sh runs this).
tf.config.experimental.enable_tensor_float_32_execution(False)


def _op_types(fn, *args):
  graph = tf.function(fn, autograph=False).get_concrete_function(*args).graph
  return {op.type for op in graph.get_operations()}


class SwitchTest(tf.test.TestCase):
  def test_auto_is_library_exactly_when_a_gpu_is_visible(self):
    self.assertEqual(kernels.get_conv_kernels(), 'auto')
    gpu = bool(tf.config.list_logical_devices('GPU'))
    self.assertEqual(kernels.resolve(), 'library' if gpu else 'cpu')  # 'cpu' on CI

  def test_context_manager_restores_the_setting(self):
    with kernels.conv_kernels('library'):
      self.assertEqual(kernels.resolve(), 'library')
      with kernels.conv_kernels('cpu'):
        self.assertEqual(kernels.resolve(), 'cpu')
      self.assertEqual(kernels.resolve(), 'library')
    self.assertEqual(kernels.get_conv_kernels(), 'auto')

  def test_set_conv_kernels(self):
    try:
      kernels.set_conv_kernels('library')
      self.assertEqual(kernels.resolve(), 'library')
    finally:
      kernels.set_conv_kernels('auto')

  def test_bad_kind_is_refused_by_name(self):
    with self.assertRaisesRegex(ValueError, 'conv_kernels.*gpu'):
      kernels.set_conv_kernels('gpu')
    with self.assertRaisesRegex(ValueError, 'conv_kernels'):
      with kernels.conv_kernels('cudnn'):
        pass
    self.assertEqual(kernels.get_conv_kernels(), 'auto')

  def test_traced_ops_follow_the_switch(self):
    conv1 = nn.Conv(4, 6, 1, seeds=nn.Seeds(1))
    x = tf.zeros([2, 4, 4, 4])
    with kernels.conv_kernels('cpu'):
      cpu = _op_types(conv1, x)
    with kernels.conv_kernels('library'):
      library = _op_types(conv1, x)
    self.assertIn('MatMul', cpu)
    self.assertNotIn('Conv2D', cpu)
    self.assertIn('Conv2D', library)
    self.assertNotIn('MatMul', library)


class ConvAgreementTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ('1x1', 1, 'same', 'relu'),
    ('3x3', 3, 'same', 'relu'),
    ('3x3_linear', 3, 'same', None),
    ('2x2_valid', 2, 'valid', None),
  )
  def test_conv_values_and_gradients_agree(self, size, padding, activation):
    layer = nn.Conv(5, 7, size, padding=padding, activation=activation, seeds=nn.Seeds(2))
    x = tf.random.stateless_normal([3, 6, 6, 5], seed=[5, 1])
    upstream = tf.random.stateless_normal(layer(x).shape, seed=[5, 2])

    def run(kind):
      with kernels.conv_kernels(kind):

        @tf.function(autograph=False)
        def fn(x):
          with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * upstream)
          return [y] + tape.gradient(loss, [x, layer.kernel, layer.bias])

        return fn(x)

    cpu, library = run('cpu'), run('library')
    for name, a, b in zip(('y', 'dx', 'dkernel', 'dbias'), cpu, library):
      self.assertAllClose(a, b, rtol=1e-5, atol=1e-5, msg=name)

  @parameterized.named_parameters(('batch', [3]), ('scalar_batch', []), ('batch_2d', [2, 1]))
  def test_invertible_conv1x1_agrees(self, batch_shape):
    bijector = InvertibleConv1x1(6, seed=tf.constant([1, 2]))
    x = tf.random.stateless_normal(batch_shape + [4, 4, 6], seed=[6, 1])

    def run(kind):
      with kernels.conv_kernels(kind):
        with tf.GradientTape() as tape:
          z, log_det = bijector.inverse_and_log_det(x)
          back, _ = bijector.forward_and_log_det(z)
          loss = tf.reduce_sum(z**2) + tf.reduce_sum(back) + tf.reduce_sum(log_det)
        return z, back, tape.gradient(loss, bijector.kernel)

    cpu, library = run('cpu'), run('library')
    self.assertEqual(cpu[0].shape, x.shape)
    for a, b in zip(cpu, library):
      self.assertAllClose(a, b, rtol=1e-5, atol=1e-5)
    self.assertAllClose(library[1], x, atol=1e-5)


class ModelAgreementTest(tf.test.TestCase):
  def test_elbo_and_its_gradients_agree(self):
    config = tdf.DenseFlowConfig.tiny(
      image_shape=(8, 8, 3),
      units_per_block=(2, 2),
      steps_per_unit=(1, 1),
      coupling_channels=(4, 4),
      attention_landmarks=2,
    )
    model = tdf.DenseFlow(config, seed=3)
    images = np.random.default_rng(0).integers(0, 256, [4, 8, 8, 3], dtype=np.uint8)
    model.initialize(images)
    variables = model.trainable_variables
    # Zero-initialised output convs would hide the coupling networks from the comparison.
    lib.perturb_variables([v for v in variables if not np.any(v.numpy())], seed=1, scale=0.1)
    seed = tf.constant([7, 8], tf.int64)

    def run(kind):
      with kernels.conv_kernels(kind):

        @tf.function(autograph=False)
        def fn(images):
          with tf.GradientTape() as tape:
            elbo = model.elbo(images, seed, training=True)
            loss = -tf.reduce_mean(elbo)
          return elbo, tape.gradient(loss, variables)

        return fn(tf.constant(images))

    (elbo_cpu, grads_cpu), (elbo_lib, grads_lib) = run('cpu'), run('library')
    self.assertAllClose(elbo_cpu, elbo_lib, rtol=1e-5)
    self.assertLen(grads_cpu, len(variables))
    for v, a, b in zip(variables, grads_cpu, grads_lib):
      self.assertIsNotNone(a, msg=v.name)
      scale = max(1.0, float(np.abs(a).max()))
      self.assertAllClose(a, b, rtol=1e-4, atol=1e-4 * scale, msg=v.name)


if __name__ == '__main__':
  tf.test.main()
