"""No broadcasting batch matmul anywhere in the product's graphs, pfor included.

TF 2.21 with oneDNN on, on Intel Xeon CPUs with AMX, corrupts the heap in a *broadcasting*
`BatchMatMulV2` (batch shapes that differ, e.g. `[16, 1, 4, 3] @ [1, 3, 4]`): wrong numbers,
`munmap_chunk(): invalid pointer`, SIGSEGV (BUILD.md, "Known TF bugs"). `tf.GradientTape.jacobian`
and `tf.vectorized_map` (pfor) create such matmuls from every batched matmul with one shared
operand, so the product multiplies batches with `nn.attention.batch_matmul` (an einsum with an
explicit batch label, which pfor widens with a free label instead). These tests walk every graph
the product runs (training gradient, evaluation, IWBO, sampling, the serving signatures, and the
pfor Jacobian and `vectorized_map` of the model) and fail on any batch matmul or einsum whose
operands' batch dimensions differ; and they run the pfor Jacobians that crashed.
"""

import flow_testlib as lib
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_denseflow as tdf
from tf_denseflow.export import DenseFlowServingModule
from tf_denseflow.nn.attention import batch_matmul, nystrom_attention

_BATCH_MATMULS = ('BatchMatMul', 'BatchMatMulV2', 'BatchMatMulV3')


def _function_names(op):
  for attr in op.node_def.attr.values():
    if attr.HasField('func'):
      yield attr.func.name
    elif attr.HasField('list'):
      yield from (f.name for f in attr.list.func)


def _ops(graph, seen=None):
  """Every op of `graph` and of the functions it calls (while/cond bodies, gradients, calls)."""
  seen = set() if seen is None else seen
  for op in graph.get_operations():
    yield op
    for name in _function_names(op):
      function = graph._get_function(name)  # private: FuncGraph has no public accessor
      if function is not None and name not in seen:
        seen.add(name)
        yield from _ops(function.graph, seen)


def _batch_dims(shape, rank):
  return None if shape.rank is None else shape.as_list()[: shape.rank - rank]


def broadcasting_products(graph) -> list:
  """Descriptions of the batch matmuls / einsums in `graph` whose batch shapes may differ."""
  bad = []
  for op in _ops(graph):
    if op.type in _BATCH_MATMULS:
      a, b = (_batch_dims(t.shape, 2) for t in op.inputs[:2])
      if a is None or b is None or a != b:
        bad.append(f'{op.type} {op.name}: {op.inputs[0].shape} @ {op.inputs[1].shape}')
    elif op.type == 'Einsum':
      equation = op.get_attr('equation').decode()
      if '.' in equation:
        bad.append(f'Einsum {op.name}: ellipsis in {equation!r}')
        continue
      inputs = equation.split('->')[0].split(',')
      if len(inputs) != 2:
        continue
      sizes = {}
      for labels, t in zip(inputs, op.inputs):
        if t.shape.rank is None:
          bad.append(f'Einsum {op.name}: unknown rank')
          break
        for label, size in zip(labels, t.shape.as_list()):
          sizes.setdefault(label, set()).add(size)
      shared = set(inputs[0]) & set(inputs[1])
      if any(len(sizes[label]) > 1 for label in shared):
        bad.append(f'Einsum {op.name} {equation!r}: {[t.shape for t in op.inputs]}')
  return bad


def _small_model():
  config = tdf.DenseFlowConfig.tiny(
    image_shape=(8, 8, 1),
    units_per_block=(3, 2),
    steps_per_unit=(1, 1),
    coupling_channels=(4, 4),
    attention_landmarks=2,
  )
  model = tdf.DenseFlow(config, seed=3)
  images = np.random.default_rng(0).integers(0, 256, [4, *config.image_shape], dtype=np.uint8)
  model.initialize(images)
  lib.perturb_variables(
    [v for v in model.trainable_variables if not np.any(v.numpy())], seed=3, scale=0.1
  )
  return model, images


def _joint_row(config, seed):
  """One unbatched `[x, noise_1..noise_K]` point, as the density path sees it."""
  x = tf.random.stateless_uniform(config.image_shape, seed=[seed, 0])
  return [x] + [
    tf.random.stateless_normal(s, seed=[seed, k + 1]) for k, s in enumerate(config.noise_shapes())
  ]


class BatchMatmulTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters(tf.float32, tf.float64)
  def test_batch_matmul_equals_matmul(self, dtype):
    rng = np.random.default_rng(1)
    a = tf.constant(rng.normal(size=[5, 3, 4]), dtype)
    b = tf.constant(rng.normal(size=[5, 4, 6]), dtype)
    c = tf.constant(rng.normal(size=[5, 6, 4]), dtype)
    self.assertAllClose(batch_matmul(a, b), tf.matmul(a, b), atol=1e-6)
    self.assertAllClose(batch_matmul(a, c, transpose_b=True), tf.matmul(a, c, transpose_b=True))

  def test_checker_finds_the_broadcasting_matmul_pfor_makes_of_tf_matmul(self):
    # The checker itself: pfor over tf.matmul with a shared operand broadcasts, batch_matmul not.
    shared = tf.constant(np.ones([1, 4, 3], np.float32))

    def jacobian_graph(product):
      @tf.function(autograph=False)
      def jac(a):
        with tf.GradientTape() as tape:
          tape.watch(a)
          out = product(a, shared)
        return tape.jacobian(out, a)

      return jac.get_concrete_function(tf.TensorSpec([1, 3, 4])).graph

    self.assertNotEmpty(broadcasting_products(jacobian_graph(tf.matmul)))
    self.assertEmpty(broadcasting_products(jacobian_graph(batch_matmul)))

  def test_product_graphs_have_no_broadcasting_batch_matmul(self):
    model, images = _small_model()
    config = model.config
    images_spec = tf.TensorSpec([None, *config.image_shape], tf.uint8)
    seed_spec = tf.TensorSpec([2], tf.int64)

    def train_gradients(images, seed):
      with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(model.elbo(images, seed, training=True))
      return tape.gradient(loss, model.trainable_variables)

    def joint_jacobian(row):
      with tf.GradientTape() as tape:
        tape.watch(row)
        latents, _ = model.bijector.inverse_and_log_det([p[None] for p in row])
        out = tf.concat([tf.reshape(t, [-1]) for t in latents], 0)
      return tape.jacobian(out, row)

    graphs = {
      'train gradients': tf.function(train_gradients).get_concrete_function(images_spec, seed_spec),
      'log_prob_bound': tf.function(
        lambda i, s: model.log_prob_bound(i, 5, s)
      ).get_concrete_function(images_spec, seed_spec),
      'sample': tf.function(lambda s: model.sample(3, s)).get_concrete_function(seed_spec),
      'pfor jacobian of the density direction': tf.function(joint_jacobian).get_concrete_function(
        [tf.TensorSpec(p.shape) for p in _joint_row(config, 0)]
      ),
      'vectorized_map of elbo': tf.function(
        lambda i: tf.vectorized_map(lambda row: model.elbo(row[None], [1, 2])[0], i)
      ).get_concrete_function(images_spec),
    }
    serving = DenseFlowServingModule(model)
    for name, function in serving.signatures.items():
      graphs[f'serving {name}'] = function.get_concrete_function()
    for name, concrete in graphs.items():
      with self.subTest(name):
        self.assertEmpty(broadcasting_products(concrete.graph), msg=name)

  def test_pfor_jacobian_of_the_attention_runs_and_matches_the_loop(self):
    # The minimal crash of BUILD.md's "Known TF bugs", through the product's attention (the
    # heap corruption is intermittent, so pfor runs several times).
    def attention(t):
      return nystrom_attention(*tf.split(t, 3, axis=-1), num_landmarks=4)

    @tf.function(autograph=False)
    def pfor_jacobian(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = attention(x)
      return tape.jacobian(y, x)

    rng = np.random.default_rng(2)
    xs = [tf.constant(rng.normal(size=[1, 16, 9]), tf.float32) for _ in range(8)]
    jacobians = [pfor_jacobian(x) for x in xs]
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(xs[0])
      y = attention(xs[0])
    self.assertAllClose(
      jacobians[0], tape.jacobian(y, xs[0], experimental_use_pfor=False), atol=1e-5
    )
    for x, jacobian in zip(xs[1:], jacobians[1:]):
      self.assertAllClose(jacobian, pfor_jacobian(x), atol=0.0)  # no corruption: reproducible

  def test_pfor_jacobian_of_the_model_matches_batch_rows(self):
    # What users do: tape.jacobian (pfor) of model.bijector.inverse, float32, oneDNN on.
    model, _ = _small_model()
    row = _joint_row(model.config, 1)
    fn = model.bijector.inverse_and_log_det
    vector, unflatten = lib.flatten_parts(row)
    with tf.GradientTape() as tape:
      tape.watch(vector)
      latents, _ = fn([p[None] for p in unflatten(vector)])
      out = tf.concat([tf.reshape(t, [-1]) for t in latents], 0)
    pfor = tape.jacobian(out, vector)
    self.assertAllClose(pfor, lib.jacobian(fn, row, use_batch_rows=True), atol=1e-4)


if __name__ == '__main__':
  tf.test.main()
