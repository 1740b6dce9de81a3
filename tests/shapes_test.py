"""tf_denseflow.shapes: static shapes as lists, and the graphs that use them."""

import numpy as np
import tensorflow as tf

from tf_denseflow import kernels, nn, shapes
from tf_denseflow.bijectors import Squeeze


def _op_types(fn, *specs):
  graph = tf.function(fn, autograph=False).get_concrete_function(*specs).graph
  return [op.type for op in graph.get_operations()]


class ShapesTest(tf.test.TestCase):
  def test_static_shapes_are_lists_and_unknown_ones_tensors(self):
    x = tf.zeros([2, 3, 4])
    self.assertEqual(shapes.shape_of(x), [2, 3, 4])
    self.assertEqual(shapes.concat_shape(shapes.shape_of(x)[:-1], [5]), [2, 3, 5])
    self.assertEqual(shapes.num_elements([2, 3, 4]), 24)
    self.assertEqual(shapes.cast(6, tf.float32).dtype, tf.float32)
    for array in (np.zeros([2, 3], np.float32), [[1.0, 2.0]]):  # what tf.shape takes
      self.assertEqual(shapes.shape_of(array), list(np.shape(array)))

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None, 3, 4])])
    def dynamic(x):
      shape = shapes.shape_of(x)
      self.assertTrue(tf.is_tensor(shape))
      joined = shapes.concat_shape(shape[:-1], [5])
      return joined, shapes.num_elements(shape), shapes.cast(shape[0], tf.float32)

    joined, n, batch = dynamic(tf.zeros([7, 3, 4]))
    self.assertAllEqual(joined, [7, 3, 5])
    self.assertEqual(int(n), 84)
    self.assertEqual(float(batch), 7.0)

  def test_static_graphs_have_no_shape_arithmetic_and_the_same_values(self):
    # A 1x1 convolution (matmul on the CPU kernels) and a squeeze traced with static shapes
    # reshape by constants: no StridedSlice or ConcatV2 of `tf.shape`; the values are those of a
    # trace with an unknown batch (which still slices `tf.shape`).
    # The CPU kernels (a 1x1 conv as a matmul; `auto` picks cuDNN's conv2d on a GPU).
    self.enter_context(kernels.conv_kernels('cpu'))
    conv = nn.Conv(6, 5, 1, activation='relu', seeds=nn.Seeds(0))
    squeeze = Squeeze()
    x = tf.random.stateless_normal([2, 4, 4, 6], seed=[1, 2])
    static = tf.TensorSpec([2, 4, 4, 6])
    dynamic = tf.TensorSpec([None, 4, 4, 6])
    for fn in (conv, squeeze.inverse):
      types = _op_types(fn, static)
      self.assertNotIn('StridedSlice', types)
      self.assertNotIn('ConcatV2', types)
      self.assertIn('StridedSlice', _op_types(fn, dynamic))
      want = tf.function(fn, autograph=False, input_signature=[dynamic])(x)
      self.assertAllEqual(tf.function(fn, autograph=False)(x), want)


if __name__ == '__main__':
  tf.test.main()
