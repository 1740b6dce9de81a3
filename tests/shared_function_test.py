"""Tests for tf_denseflow.nn.shared_function: networks of one structure share one traced function.

A small model with two Glow steps per unit, so that every unit's two coupling networks (and the
dequantization's two) have one structure. The training step's loss and gradients are traced with
and without sharing on the same weights.
"""

import collections

import flow_testlib as lib
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.grappler import tf_optimizer  # private (BUILD.md)

import tf_denseflow as tdf
from tf_denseflow import kernels, train_step, xla
from tf_denseflow.nn import recompute, shared_function

_BATCH = 4
_CALL_OPS = ('PartitionedCall', 'StatefulPartitionedCall')


def _config():
  return tdf.DenseFlowConfig.tiny(
    image_shape=(8, 8, 1),
    units_per_block=(3, 2),
    steps_per_unit=(2, 2),
    coupling_channels=(4, 4),
    attention_landmarks=2,
  )


def _model():
  config = _config()
  model = tdf.DenseFlow(config, seed=1)
  images = np.random.default_rng(0).integers(0, 256, [8, *config.image_shape], dtype=np.uint8)
  model.initialize(images)
  lib.perturb_variables([v for v in model.trainable_variables if not np.any(v.numpy())], seed=1)
  return model


def _networks(model):
  return [
    layer for layer in model._keras_layers() if isinstance(layer, shared_function.SharedNetwork)
  ]


def _train_function(model):
  """`images -> (loss, grads, batch-norm statistics)`, as the training step computes them."""
  variables = model.trainable_variables
  u, noise = model.draw_noise(tf.constant([0, 1], tf.int64), _BATCH)

  def loss_and_grads(images):
    def nll():
      return -model.elbo_terms(images, training=True, dequant_noise=u, noise=noise)['total']

    return train_step.replica_loss_and_grads(model, variables, nll, _BATCH)

  return tf.function(loss_and_grads, autograph=False)


def _images(model, seed=2):
  shape = [_BATCH, *model.config.image_shape]
  return tf.constant(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def _round_off(gradient):
  """float32 round-off of a gradient summed in another order: relative, with a floor of 1e-6."""
  return 1e-6 * max(1.0, float(tf.reduce_max(tf.abs(gradient))))


def _dense_concatenations_returned(graph_def):
  """Dense-block ConcatV2 nodes whose value a shared forward function returns (via aliases)."""
  names = []
  for f in graph_def.library.function:
    if not f.signature.name.startswith(f'__forward_{shared_function.FUNCTION_PREFIX}'):
      continue
    nodes = {n.name: n for n in f.node_def}
    for out in f.signature.output_arg:
      ref = f.ret[out.name]  # 'node:output_arg:index'
      node = nodes.get(ref.split(':')[0])
      while node is not None and node.op in ('Identity', 'IdentityN', 'Reshape'):
        # Output k of an IdentityN is its input k; the others pass input 0 on.
        index = int(ref.split(':')[2]) if node.op == 'IdentityN' else 0
        ref = node.input[index]
        node = nodes.get(ref.split(':')[0])
      if node is not None and node.op == 'ConcatV2' and 'dense_conv_block' in node.name:
        names.append(node.name)
  return names


def _shared_calls(graph_def):
  """`{function name: number of call ops}` in the main graph, for the shared functions."""
  return collections.Counter(
    node.attr['f'].func.name
    for node in graph_def.node
    if node.op in _CALL_OPS and shared_function.FUNCTION_PREFIX in node.attr['f'].func.name
  )


def _num_nodes(graph_def):
  """Nodes of the main graph and of the functions it calls (the library also keeps the shared
  functions' plain inference bodies, which a training step does not call)."""
  called = {node.attr['f'].func.name for node in graph_def.node if node.op in _CALL_OPS}
  functions = [f for f in graph_def.library.function if f.signature.name in called]
  return len(graph_def.node) + sum(len(f.node_def) for f in functions)


class SharedFunctionTest(tf.test.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = _model()
    cls.images = _images(cls.model)
    cls.networks = _networks(cls.model)
    cls.structures = {(type(n).__name__, n.structure) for n in cls.networks}
    cls.concrete = _train_function(cls.model).get_concrete_function(cls.images)
    cls.graph_def = cls.concrete.graph.as_graph_def()

  def test_model_has_networks_of_one_structure(self):
    # 10 coupling networks in 5 structures (one per unit), 3 cross-unit networks (3), and the
    # variational dequantization's 2 coupling networks (1).
    self.assertLen(self.networks, 15)
    self.assertLen(self.structures, 9)

  def test_each_structure_is_one_forward_and_one_backward_function(self):
    names = [f.signature.name for f in self.graph_def.library.function]
    forward = [n for n in names if n.startswith(f'__forward_{shared_function.FUNCTION_PREFIX}')]
    backward = [n for n in names if '__backward_' + shared_function.FUNCTION_PREFIX in n]
    self.assertLen(forward, len(self.structures))
    self.assertLen(backward, len(self.structures))
    calls = _shared_calls(self.graph_def)
    # One forward and one backward call op per network, each calling its structure's function.
    self.assertEqual(sum(calls[n] for n in forward), len(self.networks))
    self.assertEqual(sum(calls[n] for n in backward), len(self.networks))

  def test_xla_traces_inline_the_networks(self):
    # A non-inlined call inside an XLA cluster was recompiled on every step (--jit_compile:
    # 27.8 s a step instead of 0.03 s for `tiny` 16x16 b4): XLA-compatible traces inline.
    with xla.compatible():
      concrete = _train_function(self.model).get_concrete_function(self.images)
    self.assertEmpty(_shared_calls(concrete.graph.as_graph_def()))

  def test_grappler_neither_inlines_nor_specialises_the_functions(self):
    meta_graph = tf.compat.v1.train.export_meta_graph(
      graph_def=self.graph_def, graph=self.concrete.graph
    )
    meta_graph.collection_def['train_op'].node_list.value.extend(
      [t.name for t in self.concrete.outputs]
    )
    optimized = tf_optimizer.OptimizeGraph(config_pb2.ConfigProto(), meta_graph)
    names = [f.signature.name for f in optimized.library.function]
    self.assertEmpty([n for n in names if 'specialized' in n])
    self.assertLen(names, 2 * len(self.structures))
    self.assertEqual(sum(_shared_calls(optimized).values()), 2 * len(self.networks))

  def test_a_known_batch_never_reuses_a_trace_for_an_unknown_one(self):
    # tf.function serves a call from a more general earlier trace; an unknown batch's graph
    # reads its shapes at run time (more ops), so a training step's networks would depend on
    # what the process traced first (the suite once measured 9,563 nodes for 8,056 here).
    config = tdf.DenseFlowConfig.tiny(
      image_shape=(8, 8, 5),  # structures that no other test traces: these are first traces
      units_per_block=(3, 2),
      steps_per_unit=(2, 2),
      coupling_channels=(4, 4),
      attention_landmarks=2,
    )
    model = tdf.DenseFlow(config, seed=1)
    images = _images(model)
    model.initialize(images)

    def train_gradients(images, seed):  # the noise drawn for the batch: shapes follow it
      with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(model.elbo(images, seed, training=True))
      return tape.gradient(loss, model.trainable_variables)

    seed = tf.TensorSpec([2], tf.int64)
    unknown = tf.TensorSpec([None, *config.image_shape], tf.uint8)
    general = tf.function(train_gradients).get_concrete_function(unknown, seed)
    static = tf.function(train_gradients).get_concrete_function(images, seed)
    general, static = general.graph.as_graph_def(), static.graph.as_graph_def()
    self.assertTrue(set(_shared_calls(static)).isdisjoint(_shared_calls(general)))
    self.assertLess(_num_nodes(static), _num_nodes(general))

  def test_values_equal_the_inlined_networks(self):
    with shared_function.sharing(False):
      inlined = _train_function(self.model).get_concrete_function(self.images)
    self.assertEmpty(_shared_calls(inlined.graph.as_graph_def()))
    # The shared graph is smaller (half the coupling networks' ops here; ~7x at DenseFlow-74-10).
    self.assertLess(_num_nodes(self.graph_def), 0.8 * _num_nodes(inlined.graph.as_graph_def()))
    loss, grads, statistics = self.concrete(self.images)
    loss_0, grads_0, statistics_0 = inlined(self.images)
    # Equal here; grappler may sum the ELBO's terms in another order (one float32 ulp).
    self.assertAllClose(loss, loss_0, rtol=2e-7, atol=0.0)
    # Gradients summed over several consumers may add in another order: float32 round-off
    # (absolute for gradients that are zero up to round-off, e.g. a bias before a batch norm).
    for g, g0 in zip(grads, grads_0):
      self.assertAllClose(g, g0, rtol=1e-5, atol=_round_off(g0))
    self.assertLen(statistics, 2 * len(self.model.batch_norm_layers))
    for s, s0 in zip(statistics, statistics_0):
      self.assertAllClose(s, s0, rtol=1e-6, atol=0.0)

  def test_rebuilt_concatenations_give_the_same_step(self):
    # The dense blocks rebuild their concatenations in the backward pass (nn.recompute); the
    # caller's answer is part of the trace key, so this is another trace of every structure.
    with recompute.expecting_gradient(False):
      kept = _train_function(self.model).get_concrete_function(self.images)
    self.assertNotEqual(
      set(_shared_calls(kept.graph.as_graph_def())), set(_shared_calls(self.graph_def))
    )
    (loss, grads, statistics), (loss_0, grads_0, statistics_0) = (
      self.concrete(self.images),
      kept(self.images),
    )
    # The forward values are the same ops; a piece's gradients may be summed in another order.
    self.assertAllEqual(loss, loss_0)
    self.assertAllEqual(statistics, statistics_0)
    for g, g0 in zip(grads, grads_0):
      self.assertAllClose(g, g0, rtol=1e-5, atol=_round_off(g0))

  def test_no_forward_function_returns_a_dense_block_concatenation(self):
    if kernels.resolve() != 'cpu':  # the 'library' kernels (a GPU) keep the concatenations
      self.skipTest('the CPU kernels only')
    # A shared function's forward returns every tensor its backward reads: with the rebuilt
    # concatenations none of the dense blocks' (a custom gradient taking the concatenation as
    # its input had its IdentityN alias returned, and kept, through the zeros of its gradient).
    with recompute.expecting_gradient(False):
      kept = _train_function(self.model).get_concrete_function(self.images)
    returned = [
      _dense_concatenations_returned(g) for g in (self.graph_def, kept.graph.as_graph_def())
    ]
    self.assertEmpty(returned[0])
    self.assertNotEmpty(returned[1])

  def test_eval_and_sample_are_bitwise_equal_to_the_inlined_networks(self):
    seed = tf.constant([0, 3], tf.int64)
    outputs = []
    for enabled in (True, False):
      with shared_function.sharing(enabled):
        elbo = tf.function(lambda x, s: self.model.elbo(x, s), autograph=False)
        sample = tf.function(lambda s: self.model.sample(_BATCH, s), autograph=False)
        outputs.append((elbo(self.images, seed).numpy(), sample(seed).numpy()))
    self.assertAllEqual(outputs[0][0], outputs[1][0])
    self.assertAllEqual(outputs[0][1], outputs[1][1])
    # And equal to the eager model (no function at all).
    self.assertAllClose(outputs[0][0], self.model.elbo(self.images, seed), rtol=1e-6)

  def test_traced_log_det_matches_float64_jacobian(self):
    bijector = self.model.bijector
    config = self.model.config
    shapes = [config.image_shape, *config.noise_shapes()]
    parts = [
      tf.random.stateless_uniform(shapes[0], [5, 0], dtype=tf.float64),
      *[
        tf.random.stateless_normal(s, [5, k + 1], dtype=tf.float64)
        for k, s in enumerate(shapes[1:])
      ],
    ]

    @tf.function(autograph=False)
    def jacobian_and_log_det(parts):
      jac = lib.jacobian(bijector.inverse_and_log_det, parts)
      return jac, bijector.inverse_and_log_det([p[None] for p in parts])[1]

    jac, log_det = jacobian_and_log_det(parts)
    self.assertNotEmpty(
      _shared_calls(jacobian_and_log_det.get_concrete_function(parts).graph.as_graph_def())
    )
    _, want = tf.linalg.slogdet(tf.cast(jac, tf.float64))
    self.assertAllClose(float(log_det[0]), float(want), atol=1e-6, rtol=1e-8)
    eager_jac = lib.jacobian(bijector.inverse_and_log_det, parts)
    # A float32 model: traced graphs fuse ops (grappler, oneDNN) that eager runs one by one, so
    # the two agree to float32 round-off (2.3e-8 at most here, |jac| <= 3.2), not bit for bit.
    self.assertAllClose(jac, eager_jac, rtol=1e-6, atol=5e-8)

  def test_a_weight_read_outside_the_layer_weights_is_refused(self):
    outside = tf.Variable(2.0)

    class Leaky(shared_function.SharedNetwork):
      uses_training = False

      def __init__(self):
        super().__init__()
        self.structure = ('leaky',)
        self.built = True

      def body(self, x, training=False):
        return x * outside

    with self.assertRaisesRegex(RuntimeError, 'captured 1 variable'):
      tf.function(Leaky(), autograph=False)(tf.ones([2, 2]))


if __name__ == '__main__':
  tf.test.main()
