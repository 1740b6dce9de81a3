"""Tests for tf_denseflow.nn.recompute: dense blocks rebuild their concatenations for gradients."""

import collections
import contextlib
import functools

import numpy as np
import tensorflow as tf

from tf_denseflow import kernels, nn
from tf_denseflow.nn import recompute

_RESHAPES = ('Reshape', 'Identity', 'Cast')


def _root(tensor):
  """The op whose buffer `tensor` views (through reshapes, identities and no-op casts)."""
  op = tensor.op
  while op.type in _RESHAPES and op.inputs:
    op = op.inputs[0].op
  return op


def _concatenations_read_by_the_gradient(graph):
  """Forward ConcatV2 ops whose buffer an op of the tape's gradient reads."""
  names = set()
  for op in graph.get_operations():
    if not op.name.startswith('gradient_tape/'):
      continue
    for t in op.inputs:
      root = _root(t)
      if root.type == 'ConcatV2' and not root.name.startswith('gradient_tape/'):
        names.add(root.name)
  return names


_DEPTH = 3


def _block(residual=False, compute_dtype='float32'):
  block = nn.DenseConvBlock(
    6, 6, depth=_DEPTH, growth=4, residual=residual, compute_dtype=compute_dtype, seeds=nn.Seeds(3)
  )
  for v in block.trainable_variables:  # the gate starts at zero otherwise
    v.assign(tf.random.stateless_normal(v.shape, [1, len(v.name)], stddev=0.3))
  return block


def _loss_and_grads(block, x):
  with tf.GradientTape() as tape:
    tape.watch(x)
    loss = tf.reduce_sum(tf.sin(block(x)))
  return loss, tape.gradient(loss, [x, *block.trainable_variables])


class MatmulOfConcatenationTest(tf.test.TestCase):
  def test_values_and_gradients_equal_concat_and_matmul_bit_for_bit(self):
    rng = np.random.default_rng(0)
    pieces = [tf.constant(rng.normal(size=[37, k]), tf.float32) for k in (4, 3, 4)]
    b = tf.constant(rng.normal(size=[11, 5]), tf.float32)

    def grads(rebuilt):
      with tf.GradientTape() as tape:
        tape.watch([b, *pieces])
        if rebuilt:
          y = recompute.matmul_of_concatenation(pieces, b)
        else:
          y = tf.matmul(tf.concat(pieces, axis=1), b)
        loss = tf.reduce_sum(tf.cos(y))
      return [y, *tape.gradient(loss, [b, *pieces])]

    for run in (lambda f: f(), lambda f: tf.function(f)()):
      got = run(lambda: grads(True))
      want = run(lambda: grads(False))
      for g, w in zip(got, want):
        self.assertAllEqual(g, w)

  def test_without_a_tape_it_is_a_plain_concat_and_matmul(self):
    a, b = tf.ones([3, 2]), tf.ones([4, 4])
    fn = tf.function(lambda: recompute.matmul_of_concatenation([a, a], b))
    types = {op.type for op in fn.get_concrete_function().graph.get_operations()}
    self.assertNotIn('IdentityN', types)  # no custom gradient
    self.assertAllEqual(fn(), tf.matmul(tf.concat([a, a], 1), b))

  def test_expecting_gradient_overrides_and_restores(self):
    self.assertFalse(recompute.gradient_expected())
    with recompute.expecting_gradient(True):
      self.assertTrue(recompute.gradient_expected())
      with recompute.expecting_gradient(False), tf.GradientTape():
        self.assertFalse(recompute.gradient_expected())
      self.assertTrue(recompute.gradient_expected())
    self.assertFalse(recompute.gradient_expected())
    with tf.GradientTape():
      self.assertTrue(recompute.gradient_expected())
      with recompute.rebuilding(False):  # the process-wide switch wins
        self.assertFalse(recompute.gradient_expected())
      self.assertTrue(recompute.gradient_expected())


class DenseBlockTest(tf.test.TestCase):
  def setUp(self):
    super().setUp()
    # The path under test is the CPU kernels' (the 'library' kernels keep the concatenations).
    context = kernels.conv_kernels('cpu')
    context.__enter__()
    self.addCleanup(context.__exit__, None, None, None)

  def test_the_gradient_keeps_no_concatenation(self):
    block = _block()
    x = tf.random.stateless_normal([2, 5, 5, 6], [0, 1])
    kept = {}
    for rebuild in (True, False):
      with recompute.expecting_gradient(rebuild):
        fn = tf.function(lambda x: _loss_and_grads(block, x))
        graph = fn.get_concrete_function(x).graph
      kept[rebuild] = _concatenations_read_by_the_gradient(graph)
    # Without it the 1x1 convs of layers 1, 2 and the gate keep their concatenated inputs.
    self.assertLen(kept[False], 3)
    self.assertEmpty(kept[True])

  def test_values_and_gradients_equal_the_kept_concatenations(self):
    for residual in (False, True):
      block = _block(residual)
      x = tf.random.stateless_normal([2, 5, 5, 6], [0, 2])
      for traced in (False, True):
        results = []
        for rebuild in (True, False):
          with recompute.expecting_gradient(rebuild):
            fn = functools.partial(_loss_and_grads, block)
            results.append((tf.function(fn) if traced else fn)(x))
        (loss, grads), (loss_0, grads_0) = results
        self.assertAllEqual(loss, loss_0)
        for g, g0 in zip(grads, grads_0):
          if traced:  # grappler may sum a piece's gradients in another order: float32 round-off
            self.assertAllClose(g, g0, rtol=0, atol=1e-6 * float(tf.reduce_max(tf.abs(g0))))
          else:  # eager: bit for bit
            self.assertAllEqual(g, g0)

  def test_no_gradient_no_custom_gradient(self):
    block = _block()
    spec = tf.TensorSpec([2, 5, 5, 6])
    ops = []
    for context in (contextlib.nullcontext(), recompute.expecting_gradient(True)):
      with context:
        graph = tf.function(lambda x: block(x)).get_concrete_function(spec).graph
      ops.append(
        collections.Counter(
          op.type + ('' if op.outputs[0].dtype.is_floating else '(int)')
          for op in graph.get_operations()
          if op.outputs
        )
      )
    # Without a tape: one float concat per 1x1 conv with several pieces (layers 1.. and the gate),
    # and the 3x3 convs' own custom gradients only; with one, a custom gradient per such conv.
    self.assertEqual(ops[0]['ConcatV2'], _DEPTH)
    self.assertEqual(ops[0]['IdentityN'], _DEPTH)
    self.assertEqual(ops[1]['IdentityN'], 2 * _DEPTH)

  def test_reduced_precision_casts_each_piece_once(self):
    block = _block(compute_dtype='bfloat16')
    x = tf.random.stateless_normal([2, 5, 5, 6], [0, 4])  # float32, as a block input is
    fn = tf.function(lambda x: _loss_and_grads(block, x))
    graph = fn.get_concrete_function(x).graph
    placeholder = graph.inputs[0]
    casts = [
      op
      for op in graph.get_operations()
      if op.type == 'Cast' and op.inputs[0].name == placeholder.name
    ]
    self.assertLen(casts, 1)
    results = []
    for rebuild in (True, False):
      with recompute.expecting_gradient(rebuild):
        results.append(_loss_and_grads(block, x))
    (loss, grads), (loss_0, grads_0) = results
    self.assertAllEqual(loss, loss_0)
    for g, g0 in zip(grads, grads_0):
      self.assertAllEqual(g, g0)


if __name__ == '__main__':
  tf.test.main()
