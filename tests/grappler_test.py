"""tf_denseflow.grappler: the setting, and the same numbers with grappler off."""

import numpy as np
import tensorflow as tf
import train_test
from tensorflow.core.protobuf import config_pb2

from tf_denseflow import grappler, kernels, train_lib
from tf_denseflow import trainer as trainer_lib
from tf_denseflow.config import DenseFlowConfig
from tf_denseflow.model import DenseFlow


def _meta_optimizer_disabled() -> bool:
  return bool(tf.config.optimizer.get_experimental_options().get('disable_meta_optimizer'))


class GrapplerTest(tf.test.TestCase):
  def setUp(self):
    super().setUp()
    before = tf.config.optimizer.get_experimental_options().get('disable_meta_optimizer', False)
    self.addCleanup(
      tf.config.optimizer.set_experimental_options, {'disable_meta_optimizer': before}
    )

  def test_set_grappler_sets_the_process_option(self):
    self.assertFalse(grappler.set_grappler('off'))
    self.assertTrue(_meta_optimizer_disabled())
    self.assertFalse(grappler.process_enabled())
    self.assertTrue(grappler.set_grappler('on'))
    self.assertFalse(_meta_optimizer_disabled())
    self.assertTrue(grappler.set_grappler('auto'))  # TF's default; the step is wrapped
    self.assertFalse(_meta_optimizer_disabled())
    grappler.set_grappler('off')
    for bad in ('sometimes', 'true', None, 1):
      with self.assertRaisesRegex(ValueError, '`grappler` must be one of'):
        grappler.set_grappler(bad)
    self.assertTrue(_meta_optimizer_disabled())  # a refused setting changes nothing

  def test_training_step_goes_without_grappler_only_on_the_cpu_kernels_without_xla(self):
    for setting, want in (('on', (True, True)), ('off', (False, False))):
      for kind in ('cpu', 'library'):
        with kernels.conv_kernels(kind):
          self.assertEqual(grappler.training_step_grappler(setting), want)
          self.assertEqual(grappler.training_step_grappler(setting, jit_compile=True), want)
    with kernels.conv_kernels('cpu'):  # no GPU in the tests
      self.assertEqual(grappler.training_step_grappler('auto'), (False, True))
      self.assertEqual(grappler.training_step_grappler('auto', jit_compile=True), (True, True))
    with kernels.conv_kernels('library'):
      self.assertEqual(grappler.training_step_grappler('auto'), (True, True))
    with self.assertRaisesRegex(ValueError, '`grappler` must be one of'):
      grappler.training_step_grappler('sometimes')

  def test_calls_with_sets_the_option_for_the_call_only(self):
    seen = []

    def fn(x):
      seen.append(_meta_optimizer_disabled())
      if x is None:
        raise RuntimeError('boom')
      return x + 1

    grappler.set_grappler('on')
    wrapped = grappler.calls_with(fn, False)
    self.assertFalse(wrapped.grappler)
    self.assertEqual(wrapped(1), 2)
    self.assertFalse(_meta_optimizer_disabled())  # restored after the call
    with self.assertRaisesRegex(RuntimeError, 'boom'):
      wrapped(None)
    self.assertFalse(_meta_optimizer_disabled())  # and after an error
    self.assertEqual(seen, [True, True])
    grappler.set_grappler('off')
    self.assertEqual(grappler.calls_with(fn, True)(1), 2)
    self.assertEqual(seen[-1], False)
    self.assertTrue(_meta_optimizer_disabled())
    self.assertIs(grappler.calls_with(fn, None), fn)
    traced = tf.function(lambda x: x * 2.0, autograph=False)
    wrapped = grappler.calls_with(traced, False)
    self.assertIs(wrapped.python_function, traced.python_function)
    # One function called both ways (TF instantiates it once per setting): the same values.
    self.assertAllEqual(wrapped(tf.constant([1.5])), traced(tf.constant([1.5])))

  def test_calls_with_traces_under_the_networks_setting_and_calls_under_its_own(self):
    # A non-inlined function the step calls takes the setting in force when the step is traced
    # (its call op records it); the step's own graph the one in force when it is called.
    seen = []

    class _Fn:
      python_function = None

      def get_concrete_function(self, *args):
        seen.append(('trace', _meta_optimizer_disabled()))

      def __call__(self, *args):
        seen.append(('call', _meta_optimizer_disabled()))
        return 1

    grappler.set_grappler('on')
    wrapped = grappler.calls_with(_Fn(), False, networks=True)
    self.assertEqual((wrapped.grappler, wrapped.networks_grappler), (False, True))
    self.assertEqual(wrapped(), 1)
    wrapped.get_concrete_function()
    self.assertEqual(seen, [('trace', False), ('call', True), ('trace', False)])
    wrapped()  # traced already: the call alone, no per-step trace lookup
    self.assertEqual(seen[3:], [('call', True)])
    self.assertFalse(_meta_optimizer_disabled())
    self.assertFalse(grappler.calls_with(_Fn(), False).networks_grappler)  # default: enabled

  def test_networks_take_the_option_their_caller_was_traced_under(self):
    # What `calls_with(step, enabled, networks)` relies on (BUILD.md, private behaviour): the
    # call op of a non-inlined function records the options in force when its caller is traced
    # (the `config_proto` TF instantiates it with), whatever is in force when it is called.
    inner = tf.function(lambda x: tf.nn.relu(x * 2.0), autograph=False)
    inner = inner.get_concrete_function(tf.TensorSpec([2], tf.float32))
    for enabled in (True, False):
      outer = tf.function(lambda x: inner(x) + 1.0, autograph=False)
      with grappler.optimizing(enabled):
        graph = outer.get_concrete_function(tf.TensorSpec([2], tf.float32)).graph
      calls = [op for op in graph.get_operations() if op.type.endswith('PartitionedCall')]
      self.assertLen(calls, 1)
      config = config_pb2.ConfigProto.FromString(calls[0].get_attr('config_proto'))
      self.assertEqual(config.graph_options.rewrite_options.disable_meta_optimizer, not enabled)
      with grappler.optimizing(not enabled):
        self.assertAllEqual(outer(tf.constant([-1.0, 2.0])), [1.0, 5.0])

  def test_trainer_calls_its_step_as_the_setting_says(self):
    strategy = train_lib.make_strategy(num_cpu_devices=1)
    for setting, kind, want in (
      ('auto', 'cpu', (False, True)),
      ('auto', 'library', (True, True)),
      ('on', 'cpu', (True, True)),
      ('off', 'cpu', (False, False)),
    ):
      with kernels.conv_kernels(kind):
        config = train_test._config(grappler=setting)
        trainer = trainer_lib.Trainer(config, strategy, self.get_temp_dir(), lambda step: 1e-3)
        step = trainer._train_step
        self.assertEqual((step.grappler, step.networks_grappler), want, (setting, kind))

  def test_the_same_elbo_and_gradient_without_grappler(self):
    # Grappler only rewrites graphs (fusions, folding, pruning): off, a function computes the
    # same values to float32 round-off. Each setting instantiates its own tf.function.
    model = DenseFlow(DenseFlowConfig.tiny((16, 16, 3)), seed=0)
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)), tf.uint8)
    model.initialize(images)
    seed = tf.constant([3, 4], tf.int64)

    def loss_and_grads(x, s):
      with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(model.elbo(x, s, training=True))
      return loss, tape.gradient(loss, model.trainable_variables)

    results = {}
    for setting in ('on', 'off'):
      grappler.set_grappler(setting)
      results[setting] = tf.function(loss_and_grads, autograph=False)(images, seed)
    (loss_on, grads_on), (loss_off, grads_off) = results['on'], results['off']
    self.assertAllClose(loss_on, loss_off, rtol=1e-6)
    for g_on, g_off in zip(grads_on, grads_off):
      self.assertAllClose(g_on, g_off, rtol=1e-4, atol=1e-6)


if __name__ == '__main__':
  tf.test.main()
