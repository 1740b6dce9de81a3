"""Tests for tf_denseflow.optim.Adamax: the fused update equals Keras's Adamax."""

import keras
import numpy as np
import tensorflow as tf

from tf_denseflow.optim import Adamax


def _run(optimizer_cls, strategy, steps=4, learning_rate=1e-2):
  rng = np.random.default_rng(0)
  shapes = [(3, 4), (5,), (2, 2, 3)]
  inits = [rng.normal(size=s).astype(np.float32) for s in shapes]
  grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(steps)]
  with strategy.scope():
    variables = [keras.Variable(x) for x in inits]
    optimizer = optimizer_cls(learning_rate=learning_rate, epsilon=1e-7)
    optimizer.build(variables)

  @tf.function
  def step(g):
    def replica_fn(g):
      # Each replica holds the (already summed) gradient; Adamax applies it as given.
      optimizer.apply(g, variables)

    strategy.run(replica_fn, args=(g,))

  for g in grads:
    step([tf.constant(x) for x in g])
  slots = [v.numpy() for v in optimizer._m] + [v.numpy() for v in optimizer._u]
  graph = step.get_concrete_function([tf.constant(x) for x in grads[0]]).graph
  op_types = {op.type for op in graph.get_operations()}
  for function in graph.as_graph_def().library.function:
    op_types |= {node.op for node in function.node_def}
  return [v.numpy() for v in variables], slots, int(optimizer.iterations.numpy()), op_types


class AdamaxTest(tf.test.TestCase):
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
    got, got_slots, _, _ = _run(Adamax, tf.distribute.MirroredStrategy(devices))
    for a, b in zip(got + got_slots, want + want_slots):
      self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)

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


if __name__ == '__main__':
  tf.test.main()
