"""Tests for tf_denseflow.nn: conv/batch-norm semantics (PyTorch's), the Nystrom attention (pinv
iteration, the official raw-reshape token layout), and the conditioner networks.
"""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_denseflow import grappler, nn
from tf_denseflow.nn.attention import (
  batch_matmul,
  iterative_pinv,
  nystrom_attention,
  softmax_over_rows,
)


def _softmax_matrices(m, diagonal, seed, batch=16):
  """Column-stochastic `[batch, m, m]` matrices, as the softmax(axis=-2) of the attention."""
  logits = np.random.default_rng(seed).normal(size=[batch, m, m]) + diagonal * np.eye(m)
  return tf.nn.softmax(tf.constant(logits, tf.float64), axis=-2)


def _numpy_iterative_pinv(k, num_iterations=6):
  col = np.abs(k).sum(axis=-2).max(axis=-1)
  row = np.abs(k).sum(axis=-1).max(axis=-1)
  v = np.swapaxes(k, -1, -2) / (col * row)[..., None, None]
  eye = np.eye(k.shape[-1])
  for _ in range(num_iterations):
    kv = k @ v
    v = 0.25 * v @ (13 * eye - kv @ (15 * eye - kv @ (7 * eye - kv)))
  return v


def _numpy_softmax(a, axis):
  e = np.exp(a - a.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _numpy_nystrom(q, k, v, m):
  n, length, embed = q.shape
  scale = 1.0 / np.sqrt(length)
  qm = q.reshape(n, m, length // m, embed).mean(axis=2) * scale
  km = k.reshape(n, m, length // m, embed).mean(axis=2) * scale
  a1 = _numpy_softmax(q @ np.swapaxes(km, 1, 2), axis=-2)
  a2 = _numpy_softmax(qm @ np.swapaxes(km, 1, 2), axis=-2)
  a3 = _numpy_softmax(qm @ np.swapaxes(k, 1, 2), axis=-2)
  return (a1 @ _numpy_iterative_pinv(a2)) @ (a3 @ v) + v


def _numpy_conv1x1(x, layer):
  kernel = layer.kernel.numpy()[0, 0]
  return x @ kernel + (layer.bias.numpy() if layer.bias is not None else 0.0)


class IterativePinvTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(('m4', 4), ('m8', 8))
  def test_default_iterations_match_pinv_for_well_conditioned_softmax(self, m):
    k = _softmax_matrices(m, diagonal=4.0, seed=m)
    self.assertLess(np.max(np.linalg.cond(k.numpy())), 10.0)
    want = np.linalg.pinv(k.numpy())
    self.assertAllClose(iterative_pinv(k), want, atol=1e-6 * np.max(np.abs(want)))
    got32 = iterative_pinv(tf.cast(k, tf.float32))
    self.assertAllClose(got32, want, atol=1e-4 * np.max(np.abs(want)))

  @parameterized.named_parameters(('m2', 2), ('m4', 4), ('m8', 8))
  def test_converges_to_pinv_for_generic_softmax(self, m):
    # Near-uniform softmax matrices are ill-conditioned (cond ~ 1e2): the iteration needs more
    # than the official 6 steps there (it converges quadratically once started).
    k = _softmax_matrices(m, diagonal=0.0, seed=10 + m)
    want = np.linalg.pinv(k.numpy())
    got = iterative_pinv(k, num_iterations=25)
    self.assertAllClose(got, want, atol=1e-8 * np.max(np.abs(want)))
    k_np = k.numpy()
    self.assertAllClose(k_np @ got.numpy() @ k_np, k_np, atol=1e-10)  # Moore-Penrose

  def test_matches_the_numpy_formula(self):
    k = _softmax_matrices(4, diagonal=1.0, seed=3)
    self.assertAllClose(iterative_pinv(k), _numpy_iterative_pinv(k.numpy()), rtol=1e-10)


def _pinv_with_scaled_eye(k, num_iterations=6):
  """`iterative_pinv` as it was before session 10: `c * tf.eye(m)` made by a Mul in the graph."""
  abs_k = tf.abs(k)
  col = tf.reduce_max(tf.reduce_sum(abs_k, axis=-2), axis=-1)
  row = tf.reduce_max(tf.reduce_sum(abs_k, axis=-1), axis=-1)
  v = tf.linalg.matrix_transpose(k) / (col * row)[..., None, None]
  eye = tf.eye(k.shape[-1], dtype=k.dtype)
  for _ in range(num_iterations):
    kv = batch_matmul(k, v)
    v = 0.25 * batch_matmul(
      v, 13.0 * eye - batch_matmul(kv, 15.0 * eye - batch_matmul(kv, 7.0 * eye - kv))
    )
  return v


def _nystrom_before(q, k, v, m):
  """`nystrom_attention` as it was before session 11: scalar and `[m, m]` constants."""
  length, embed = q.shape[-2], q.shape[-1]
  scale = 1.0 / np.sqrt(length)
  qm = tf.reduce_mean(tf.reshape(q, [-1, m, length // m, embed]), axis=2) * scale
  km = tf.reduce_mean(tf.reshape(k, [-1, m, length // m, embed]), axis=2) * scale
  a1 = softmax_over_rows(batch_matmul(q, km, transpose_b=True))
  a2 = softmax_over_rows(batch_matmul(qm, km, transpose_b=True))
  a3 = softmax_over_rows(batch_matmul(qm, k, transpose_b=True))
  return batch_matmul(batch_matmul(a1, _pinv_with_scaled_eye(a2)), batch_matmul(a3, v)) + v


class FewerOpsSameBitsTest(tf.test.TestCase):
  """The attention's rewrites for smaller graphs (session 10) compute the same bits."""

  def test_softmax_over_rows_is_softmax_over_axis_minus_2_with_its_gradient(self):
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=[4, 9, 5]) * 3.0, tf.float32)
    w = tf.constant(rng.normal(size=[4, 9, 5]), tf.float32)

    @tf.function(autograph=False)
    def both(x):
      with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours, tfs = softmax_over_rows(x), tf.nn.softmax(x, axis=-2)
        loss_ours, loss_tf = tf.reduce_sum(ours * w), tf.reduce_sum(tfs * w)
      return ours, tfs, tape.gradient(loss_ours, x), tape.gradient(loss_tf, x)

    for fn in (both, both.python_function):  # traced and eager
      ours, tfs, grad_ours, grad_tf = fn(x)
      self.assertAllEqual(ours, tfs)
      self.assertAllEqual(grad_ours, grad_tf)

  def test_attention_with_operand_shaped_constants_is_the_same_with_its_gradient(self):
    # Session 11: the constants take the operands' static shape (a smaller gradient graph).
    # The same graph ops on the same values: bit-equal eagerly and in graphs as written
    # (grappler off; its arithmetic rewrites, which run on the networks under every
    # `--grappler` but 'off', follow the graph's structure and may round a gradient's last bit
    # otherwise: one ulp in 21 of these 288 gradient entries).
    rng = np.random.default_rng(4)
    q, k, v = (tf.constant(rng.normal(size=[3, 16, 6]), tf.float32) for _ in range(3))
    w = tf.constant(rng.normal(size=[3, 16, 6]), tf.float32)

    def value_and_grads(attention):
      def fn(q, k, v):
        with tf.GradientTape() as tape:
          tape.watch([q, k, v])
          out = attention(q, k, v, 4)
          loss = tf.reduce_sum(out * w)
        return out, tape.gradient(loss, [q, k, v])

      return fn

    ours, before = value_and_grads(nystrom_attention), value_and_grads(_nystrom_before)
    spec = [tf.TensorSpec([None, 16, 6], tf.float32)] * 3
    with grappler.optimizing(False):
      for wrap in (
        lambda fn: tf.function(fn, autograph=False),  # static shapes
        lambda fn: tf.function(fn, autograph=False, input_signature=spec),  # batch unknown
        lambda fn: fn,  # eager
      ):
        (out_ours, grads_ours), (out_before, grads_before) = (
          wrap(ours)(q, k, v),
          wrap(before)(q, k, v),
        )
        self.assertAllEqual(out_ours, out_before)
        for g_ours, g_before in zip(grads_ours, grads_before):
          self.assertAllEqual(g_ours, g_before)

    def graph_ops(fn):
      graph = tf.function(fn, autograph=False).get_concrete_function(q, k, v).graph
      return len(graph.as_graph_def().node)

    self.assertLess(graph_ops(ours), graph_ops(before) - 60)  # 405 against 490 today

  def test_iterative_pinv_with_constant_scaled_eyes_is_the_same(self):
    k = tf.cast(_softmax_matrices(4, diagonal=1.0, seed=5), tf.float32)
    for fn in (tf.function(iterative_pinv), iterative_pinv):
      self.assertAllEqual(fn(k), _pinv_with_scaled_eye(k))


class NystromAttentionTest(tf.test.TestCase, parameterized.TestCase):
  def _layer_and_input(self, tokens, seed=0):
    layer = nn.NystromAttention(8, num_landmarks=2, tokens=tokens, seeds=nn.Seeds(seed))
    x = tf.random.stateless_normal([2, 4, 2, 8], seed=[seed, 1])
    return layer, x

  def test_official_tokens_are_the_raw_reshape_of_the_nchw_buffer(self):
    layer, x = self._layer_and_input('official')
    n, h, w, _ = x.shape
    length, e = h * w, layer.embed
    qkv = _numpy_conv1x1(x.numpy(), layer.qkv)  # [N, H, W, 3E]
    nchw = np.transpose(qkv, [0, 3, 1, 2])
    tokens = nchw.reshape(n, length, 3 * e)  # a raw row-major reinterpretation, not a permute
    # Token t, feature j reads channel (t*3E + j) // L at pixel (t*3E + j) % L.
    t, j = 5, 7
    flat = t * 3 * e + j
    self.assertEqual(tokens[1, t, j], nchw[1, flat // length, (flat % length) // w, flat % w])
    q, k, v = np.split(tokens.astype(np.float64), 3, axis=-1)
    o = _numpy_nystrom(q, k, v, 2)  # [N, L, E]
    o = np.transpose(o.reshape(n, e, h, w), [0, 2, 3, 1])  # raw reshape back, then NHWC
    want = _numpy_conv1x1(o, layer.out)
    self.assertAllClose(layer(x), want, atol=1e-4, rtol=1e-4)

  def test_pixel_tokens_are_one_token_per_pixel(self):
    layer, x = self._layer_and_input('pixel', seed=1)
    n, h, w, _ = x.shape
    qkv = _numpy_conv1x1(x.numpy(), layer.qkv).astype(np.float64)
    q, k, v = np.split(qkv.reshape(n, h * w, -1), 3, axis=-1)
    o = _numpy_nystrom(q, k, v, 2).reshape(n, h, w, layer.embed)
    self.assertAllClose(layer(x), _numpy_conv1x1(o, layer.out), atol=1e-4, rtol=1e-4)

  def test_official_and_pixel_layouts_differ(self):
    official, x = self._layer_and_input('official', seed=2)
    pixel = nn.NystromAttention(8, num_landmarks=2, tokens='pixel', seeds=nn.Seeds(2))
    self.assertNotAllClose(official(x), pixel(x))

  def test_nystrom_attention_function(self):
    rng = np.random.default_rng(4)
    q, k, v = (rng.normal(size=[2, 8, 3]) for _ in range(3))
    got = nystrom_attention(tf.constant(q), tf.constant(k), tf.constant(v), num_landmarks=4)
    self.assertAllClose(got, _numpy_nystrom(q, k, v, 4), rtol=1e-8, atol=1e-8)


class BatchNormTest(tf.test.TestCase):
  def test_training_updates_running_stats_with_unbiased_variance_and_momentum(self):
    layer = nn.BatchNorm(3)
    layer.gamma.assign([1.0, 2.0, 0.5])
    layer.beta.assign([0.0, 1.0, -1.0])
    mean, var = np.zeros(3), np.ones(3)
    rng = np.random.default_rng(0)
    for step in range(2):
      x = rng.normal(loc=[1.0, -2.0, 0.5], scale=[1.0, 3.0, 0.2], size=[4, 3, 2, 3]).astype(
        np.float32
      )
      y = layer(tf.constant(x), training=True)
      flat = x.reshape(-1, 3)
      batch_mean, biased, unbiased = flat.mean(0), flat.var(0), flat.var(0, ddof=1)
      want = (x - batch_mean) / np.sqrt(biased + 1e-5) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
      self.assertAllClose(y, want, atol=1e-4, msg=f'step {step}')
      mean = 0.9 * mean + 0.1 * batch_mean
      var = 0.9 * var + 0.1 * unbiased
      self.assertAllClose(layer.moving_mean, mean, atol=1e-5)
      self.assertAllClose(layer.moving_variance, var, atol=1e-5)

  def test_collected_updates_equal_assigned_updates_and_assign_nothing(self):
    x = tf.random.stateless_normal([4, 3, 3, 2], seed=[5, 1]) * 2.0 + 1.0
    assigned = nn.BatchNorm(2)
    want_y = [assigned(x, training=True), assigned(2.0 * x, training=True)]
    collected = nn.BatchNorm(2)
    other = nn.BatchNorm(2)
    with nn.collect_batch_norm_updates() as updates:
      got_y = [collected(x, training=True), collected(2.0 * x, training=True)]
      updates.freeze()
      collected(5.0 * x, training=True)  # a recomputation: ignored
    self.assertAllClose(got_y, want_y)
    self.assertAllEqual(collected.moving_mean, tf.zeros([2]))
    self.assertAllEqual(collected.moving_variance, tf.ones([2]))
    mean, variance, other_mean, other_variance = updates.new_values([collected, other])
    self.assertAllClose(mean, assigned.moving_mean, atol=1e-6)
    self.assertAllClose(variance, assigned.moving_variance, atol=1e-6)
    self.assertAllEqual(other_mean, tf.zeros([2]))
    self.assertAllEqual(other_variance, tf.ones([2]))
    # Outside the context, training assigns again.
    collected(x, training=True)
    self.assertNotAllClose(collected.moving_mean, tf.zeros([2]))

  def test_inference_uses_running_stats_and_leaves_them(self):
    layer = nn.BatchNorm(2)
    layer.moving_mean.assign([1.0, -1.0])
    layer.moving_variance.assign([4.0, 0.25])
    x = tf.random.stateless_normal([3, 2, 2, 2], seed=[1, 1])
    want = (x.numpy() - [1.0, -1.0]) / np.sqrt(np.array([4.0, 0.25]) + 1e-5)
    self.assertAllClose(layer(x), want, atol=1e-5)
    self.assertAllClose(layer(x, training=False), want, atol=1e-5)
    self.assertAllEqual(layer.moving_mean, [1.0, -1.0])
    self.assertLen(layer.trainable_variables, 2)
    self.assertLen(layer.non_trainable_variables, 2)

  def test_bfloat16_inputs_use_float32_statistics(self):
    x = tf.random.stateless_normal([2, 3, 3, 2], seed=[1, 2]) * 3.0 + 5.0
    want = nn.BatchNorm(2)(x, training=True)
    layer = nn.BatchNorm(2)
    y = layer(tf.cast(x, tf.bfloat16), training=True)  # Keras casts inputs to float32 first
    self.assertAllClose(tf.cast(y, tf.float32), want, atol=0.05)
    self.assertEqual(layer.moving_mean.dtype, tf.float32)
    self.assertAllClose(layer.moving_mean, 0.1 * tf.reduce_mean(x, axis=[0, 1, 2]), atol=0.05)


class ConvTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ('1x1', 1, 1, 'same'), ('3x3', 3, 1, 'same'), ('2x2s2', 2, 2, 'valid')
  )
  def test_matches_tf_conv2d(self, size, strides, padding):
    layer = nn.Conv(3, 5, size, strides=strides, padding=padding, seeds=nn.Seeds(1))
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[2, 1])
    want = tf.nn.conv2d(x, layer.kernel, strides, padding.upper()) + layer.bias
    self.assertAllClose(layer(x), want, atol=1e-5)

  @parameterized.named_parameters(
    ('1x1', 1, 1, 'same'), ('3x3', 3, 1, 'same'), ('2x2s2', 2, 2, 'valid')
  )
  def test_empty_batch_has_the_output_shape(self, size, strides, padding):
    # oneDNN's Conv2D returns its input for an empty batch on Intel AMX CPUs (BUILD.md).
    layer = nn.Conv(16, 8, size, strides=strides, padding=padding, seeds=nn.Seeds(1))
    out = [0, 4 // strides, 4 // strides, 8]
    self.assertEqual(layer(tf.zeros([0, 4, 4, 16])).shape, out)  # traced: model_test

  @parameterized.named_parameters(('1x1', 1, 1, 'same'), ('3x3', 3, 1, 'same'))
  def test_relu_activation(self, size, strides, padding):
    layer = nn.Conv(3, 5, size, activation='relu', seeds=nn.Seeds(1))
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[2, 1])
    want = tf.nn.relu(tf.nn.conv2d(x, layer.kernel, strides, padding.upper()) + layer.bias)
    self.assertAllClose(layer(x), want, atol=1e-5)
    with self.assertRaisesRegex(ValueError, 'activation'):
      nn.Conv(3, 5, 1, activation='gelu')

  @parameterized.named_parameters(
    ('wide_to_narrow', [2, 5, 4, 7], 3),
    ('narrow_to_wide', [3, 4, 4, 2], 6),
    ('1x1_image', [2, 1, 1, 4], 3),
  )
  def test_conv3x3_same_gradients_equal_conv2d_gradients(self, x_shape, out_channels):
    # float64: the tap-matrix gradients must equal TF's Conv2DBackpropFilter/Input to roundoff.
    x = tf.random.stateless_normal(x_shape, seed=[3, 1], dtype=tf.float64)
    kernel = tf.random.stateless_normal(
      [3, 3, x_shape[-1], out_channels], seed=[3, 2], dtype=tf.float64
    )
    upstream = tf.random.stateless_normal(
      x_shape[:-1] + [out_channels], seed=[3, 3], dtype=tf.float64
    )

    def grads(conv):
      with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        loss = tf.reduce_sum(conv(x, kernel) * upstream)
      return tape.gradient(loss, [x, kernel])

    want = grads(lambda a, k: tf.nn.conv2d(a, k, 1, 'SAME'))
    got = grads(nn.conv3x3_same)
    self.assertAllClose(nn.conv3x3_same(x, kernel), tf.nn.conv2d(x, kernel, 1, 'SAME'), atol=1e-12)
    self.assertAllClose(got[0], want[0], atol=1e-10)
    self.assertAllClose(got[1], want[1], atol=1e-10)

  def test_conv3x3_same_jacobian_in_a_function(self):
    # Jacobians (pfor over the custom gradient) and unknown batch size inside tf.function.
    kernel = tf.random.stateless_normal([3, 3, 2, 3], seed=[4, 1], dtype=tf.float64)

    @tf.function(input_signature=[tf.TensorSpec([None, 3, 3, 2], tf.float64)])
    def jacobian(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = nn.conv3x3_same(x, kernel)
      return tape.batch_jacobian(y, x), tf.nn.conv2d(x, kernel, 1, 'SAME')

    x = tf.random.stateless_normal([2, 3, 3, 2], seed=[4, 2], dtype=tf.float64)
    jac, _ = jacobian(x)
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = tf.nn.conv2d(x, kernel, 1, 'SAME')
    self.assertAllClose(jac, tape.batch_jacobian(y, x), atol=1e-10)

  def test_pytorch_default_init_and_zero_init(self):
    layer = nn.Conv(6, 4, 3, seeds=nn.Seeds(3))
    bound = 1.0 / np.sqrt(6 * 9)
    self.assertAllInRange(layer.kernel, -bound, bound)
    self.assertAllInRange(layer.bias, -bound, bound)
    self.assertGreater(np.std(layer.kernel.numpy()), 0.5 * bound / np.sqrt(3))
    zero = nn.Conv(6, 4, 1, zero_init=True)
    self.assertAllEqual(zero.kernel, tf.zeros([1, 1, 6, 4]))
    self.assertAllEqual(zero.bias, tf.zeros([4]))
    self.assertIsNone(nn.Conv(6, 4, 1, use_bias=False).bias)

  def test_seeds_are_deterministic(self):
    a = nn.Conv(3, 3, 3, seeds=nn.Seeds(7))
    b = nn.Conv(3, 3, 3, seeds=nn.Seeds(7))
    c = nn.Conv(3, 3, 3, seeds=nn.Seeds(8))
    self.assertAllEqual(a.kernel, b.kernel)
    self.assertNotAllClose(a.kernel, c.kernel)
    seeds = nn.Seeds(5)
    self.assertAllEqual(seeds(), [5, 1])
    self.assertAllEqual(seeds(), [5, 2])

  def test_bfloat16_compute_keeps_float32_weights(self):
    layer = nn.Conv(3, 4, 3, compute_dtype='bfloat16', seeds=nn.Seeds(1))
    self.assertEqual(layer.kernel.dtype, tf.float32)
    y = layer(tf.ones([1, 4, 4, 3]))
    self.assertEqual(y.dtype, tf.bfloat16)

  @parameterized.named_parameters(('1x1', 1), ('3x3', 3))
  def test_rejects_wrong_input_channels(self, size):
    # 6 channels into a 3-channel conv must fail, not run as a grouped convolution.
    layer = nn.Conv(3, 12, size)
    with self.assertRaises((ValueError, tf.errors.InvalidArgumentError)):
      layer(tf.ones([1, 4, 4, 6]))


class DenseNetTest(tf.test.TestCase):
  def test_gated_conv(self):
    layer = nn.GatedConv(4, 2, seeds=nn.Seeds(1))
    x = tf.random.stateless_normal([2, 3, 3, 4], seed=[3, 1])
    a, b, c = np.split(_numpy_conv1x1(x.numpy(), layer.conv), 3, axis=-1)
    self.assertAllClose(layer(x), a + b / (1.0 + np.exp(-c)), atol=1e-5)

  def test_dense_layer_and_block_shapes(self):
    layer = nn.DenseLayer(4, 3, seeds=nn.Seeds(2))
    x = tf.random.stateless_normal([2, 3, 3, 4], seed=[3, 2])
    y = layer(x)
    self.assertEqual(y.shape, [2, 3, 3, 7])
    self.assertAllEqual(y[..., :4], x)
    self.assertAllGreaterEqual(y[..., 4:], 0.0)
    block = nn.DenseConvBlock(4, 5, depth=2, growth=3, seeds=nn.Seeds(3))
    self.assertEqual(block(x).shape, [2, 3, 3, 5])
    self.assertEqual(block.gate.conv.in_channels, 4 + 2 * 3)
    residual = nn.DenseConvBlock(4, 4, depth=1, growth=3, residual=True, seeds=nn.Seeds(4))
    self.assertEqual(residual(x).shape, [2, 3, 3, 4])
    with self.assertRaisesRegex(ValueError, 'in_channels'):
      nn.DenseConvBlock(4, 5, depth=1, growth=3, residual=True)


class ConditionerNetworkTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(('attention', True), ('no_attention', False))
  def test_coupling_network_is_zero_at_init(self, use_attention):
    net = nn.CouplingNetwork(
      3, 4, 8, depth=2, growth=4, use_attention=use_attention, num_landmarks=2
    )
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[4, 1])
    y = net(x, training=True)
    self.assertEqual(y.shape, [2, 4, 4, 4])
    self.assertEqual(y.dtype, tf.float32)
    self.assertAllEqual(y, tf.zeros_like(y))
    self.assertLen(net.trainable_variables, 2 + (4 if use_attention else 0) + 4 * 2 + 2 + 2 + 1 + 2)

  def test_coupling_network_bfloat16_returns_float32(self):
    net = nn.CouplingNetwork(3, 4, 8, 1, 4, num_landmarks=2, compute_dtype='bfloat16')
    self.assertEqual(net(tf.ones([1, 4, 4, 3])).dtype, tf.float32)

  def test_every_conditioner_network_in_bfloat16_returns_float32_and_traces_its_own_body(self):
    # --precision covers the cross-unit and dequantization networks too. Each returns float32;
    # its traced body (a shared function keyed by `structure`) is not the float32 twin's.
    images = tf.constant(np.random.default_rng(0).integers(0, 256, [2, 8, 8, 3]), tf.uint8)
    cases = [
      (lambda dt: nn.CrossUnitNetwork(5, 2, compute_dtype=dt), tf.ones([2, 4, 4, 5])),
      (lambda dt: nn.ContextNetwork(3, 8, 1, 4, compute_dtype=dt), images),
      (
        lambda dt: nn.DequantCouplingNetwork(14, 6, 8, 1, 4, compute_dtype=dt),
        tf.ones([2, 4, 4, 14]),
      ),
    ]
    for make, x in cases:
      twins = {dt: make(dt) for dt in ('float32', 'bfloat16')}
      for dt, net in twins.items():
        self.assertEqual(net(x).dtype, tf.float32, msg=f'{type(net).__name__} {dt}')
        graph = tf.function(lambda x, net=net: net(x)).get_concrete_function(x).graph
        nodes = list(graph.as_graph_def().node)
        for function in graph.as_graph_def().library.function:
          nodes.extend(function.node_def)
        dtypes = {n.attr['T'].type for n in nodes if n.op in ('MatMul', 'Conv2D')}
        want = tf.bfloat16 if dt == 'bfloat16' else tf.float32
        self.assertEqual(dtypes, {want.as_datatype_enum}, msg=f'{type(net).__name__} {dt}')

  def test_cross_unit_network(self):
    net = nn.CrossUnitNetwork(5, 2, seeds=nn.Seeds(1))
    y = net(tf.ones([2, 4, 4, 5]))
    self.assertEqual(y.shape, [2, 4, 4, 4])
    self.assertAllEqual(y, tf.zeros_like(y))
    self.assertEqual(net.hidden.out_channels, 20)  # 4x width
    self.assertEqual(net.hidden.kernel_size, 3)

  def test_context_and_dequant_coupling_networks(self):
    ctx = nn.ContextNetwork(3, 8, depth=1, growth=4, seeds=nn.Seeds(2))
    images = tf.constant(np.random.default_rng(0).integers(0, 256, [2, 8, 8, 3]), tf.uint8)
    self.assertEqual(ctx(images).shape, [2, 4, 4, 8])
    net = nn.DequantCouplingNetwork(6 + 8, 6, 8, depth=1, growth=4, seeds=nn.Seeds(3))
    y = net(tf.ones([2, 4, 4, 14]))
    self.assertEqual(y.shape, [2, 4, 4, 6])
    self.assertAllEqual(y, tf.zeros_like(y))


if __name__ == '__main__':
  tf.test.main()
