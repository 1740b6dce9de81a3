"""Tests for tf_denseflow.trainer: the images of ActNorm's initialisation (`--init_examples`).

glow's `n_batch_init`: a fresh run initialises ActNorm on the first `init_examples` images of the
training stream; the default, None, is the first global batch (the behaviour before the flag).
The references are built by hand: the training stream at the training batch size, its first
batches concatenated, then `DenseFlow.initialize` on a fresh model of the run's seed. The run is
train_test.py's tiny one (8x8 embedded photo patches, 64 training images, global batch 4).
"""

import numpy as np
import tensorflow as tf
import train_test
from absl.testing import parameterized

from tf_denseflow import data as data_lib
from tf_denseflow import seeds, train_lib
from tf_denseflow import trainer as trainer_lib
from tf_denseflow.model import DenseFlow


def _weights(model):
  return train_test._values(model.trainable_variables + model.non_trainable_keras_variables)


def _actnorm_weights(model):
  return train_test._values(
    [v for step in model.bijector.steps for v in (step.act_norm.shift, step.act_norm.log_scale)]
  )


def _stream_head(config, count):
  """The first `count` images of the training stream, read in training batches."""
  batch = config.optim.global_batch_size
  stream = data_lib.make_train_dataset(config.data, batch, seed=config.seed)
  return np.concatenate(list(stream.take(-(-count // batch)).as_numpy_iterator()))[:count]


class InitExamplesTest(train_test._TestCase):
  def _initialised(self, replicas=1, **overrides):
    """The model of a fresh Trainer after `restore_or_initialize(resuming=False)`."""
    config = train_test._config(replicas=replicas, **overrides)
    strategy = train_lib.make_strategy(num_cpu_devices=replicas)
    trainer = trainer_lib.Trainer(config, strategy, self._new_dir(), lambda step: 1e-3)
    self.assertEqual(trainer.restore_or_initialize(resuming=False), 0)
    return trainer.model

  def _reference(self, count):
    """A model of the run's seed initialised on the first `count` images of the stream."""
    config = train_test._config()
    images = _stream_head(config, count)
    self.assertEqual(images.shape, (count, 8, 8, 3))
    with train_lib.make_strategy(num_cpu_devices=1).scope():
      model = DenseFlow(config.model, seed=config.seed)
      model.initialize(images, seed=(config.seed, seeds.INIT_STREAM))
    return model

  def test_default_is_the_first_global_batch_bit_for_bit(self):
    default = _weights(self._initialised())
    self.assertLen(default, len(_weights(self._reference(4))))
    for weights in (_weights(self._initialised(init_examples=4)), _weights(self._reference(4))):
      for a, b in zip(default, weights, strict=True):
        self.assertAllEqual(a, b)

  @parameterized.named_parameters(
    ('two_batches', 8, 1),
    ('one_and_a_half_batches', 6, 1),
    ('past_the_first_epoch', 70, 1),  # 64 training images: the stream's second epoch starts
    ('not_divisible_by_two_replicas', 7, 2),  # the init runs once, in cross-replica context
  )
  def test_init_examples_are_the_first_images_of_the_stream(self, count, replicas):
    model = self._initialised(replicas=replicas, init_examples=count)
    for a, b in zip(_weights(model), _weights(self._reference(count)), strict=True):
      self.assertAllEqual(a, b)
    default = _actnorm_weights(self._reference(4))
    self.assertTrue(
      any(np.any(a != b) for a, b in zip(_actnorm_weights(model), default, strict=True))
    )

  @parameterized.named_parameters(
    ('zero', 0, '`--init_examples` must be >= 1, got 0'),
    ('negative', -1, '`--init_examples` must be >= 1, got -1'),
    ('fractional', 2.5, '`--init_examples` must be an integer'),
    ('above_int32', 2**31, '`--init_examples` must be <= 2147483647'),
  )
  def test_bad_init_examples_are_refused_by_name(self, value, message):
    with self.assertRaisesRegex(train_lib.ConfigError, message):
      train_test._config(init_examples=value)


class EvaluateTest(train_test._TestCase):
  def test_every_evaluation_is_one_whole_pass_of_one_iterator(self):
    # The eval dataset repeats and one iterator serves every evaluation (a fresh iterator per
    # evaluation waited on a ~20.5 s wall-clock grid): each evaluation must take exactly one
    # padded pass from its first batch, so repeated evaluations of the same weights agree, and
    # with the test split not a multiple of the batch (7 examples, batch 4: one padded batch).
    config = train_test._config(eval_examples=7, eval_batch_size=4)
    strategy = train_lib.make_strategy(num_cpu_devices=1)
    trainer = trainer_lib.Trainer(config, strategy, self._new_dir(), lambda step: 1e-3)
    trainer.restore_or_initialize(resuming=False)
    first = trainer.evaluate()
    self.assertTrue(np.isfinite(first))
    self.assertEqual(trainer._eval_batches, 2)
    for _ in range(2):
      self.assertEqual(trainer.evaluate(), first)


if __name__ == '__main__':
  tf.test.main()
