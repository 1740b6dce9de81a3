"""Tests for tf_denseflow.workdir: restores are all or nothing, damaged files are named.

Models are micro DenseFlows (two blocks, one Glow step per unit), never trained: a checkpoint
needs only variables.
"""

import dataclasses
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_denseflow import workdir as workdir_lib
from tf_denseflow.config import DenseFlowConfig
from tf_denseflow.model import DenseFlow
from tf_denseflow.optim import Adamax


def _config(steps_per_unit=(1, 1), **overrides) -> DenseFlowConfig:
  return DenseFlowConfig.tiny(
    (8, 8, 3),
    units_per_block=(2, 1),
    steps_per_unit=steps_per_unit,
    coupling_channels=(8, 8),
    use_attention=False,
    dequantization='uniform',
    **overrides,
  )


def _model(config: DenseFlowConfig) -> DenseFlow:
  model = DenseFlow(config, seed=1)
  images = np.random.default_rng(0).integers(0, 256, [4, 8, 8, 3], dtype=np.uint8)
  model.initialize(images)
  return model


def _values(model):
  variables = list(model.variables) + model.trainable_variables
  variables += model.non_trainable_keras_variables
  return [np.array(tf.convert_to_tensor(v)) for v in variables]


class WorkdirTest(tf.test.TestCase, parameterized.TestCase):
  def _dir(self) -> str:
    path = tempfile.mkdtemp(prefix='workdir_test_')
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def _legacy_checkpoint(self, workdir, model, config):
    """A checkpoint as written before the model config was stored with it."""
    workdir_lib.save_model_config(workdir, config)
    step = tf.Variable(0, dtype=tf.int64)
    prefix = os.path.join(workdir_lib.checkpoint_dir(workdir), 'ckpt')
    return tf.train.Checkpoint(model=model, step=step).save(prefix)

  def test_atomic_write_replaces_the_file_and_leaves_no_temporary(self):
    path = os.path.join(self._dir(), 'sub', 'f.json')
    self.assertEqual(workdir_lib.atomic_write(path, 'old'), path)
    workdir_lib.atomic_write(path, b'new')
    with open(path, 'rb') as f:
      self.assertEqual(f.read(), b'new')
    self.assertEqual(os.listdir(os.path.dirname(path)), ['f.json'])

  def test_layout_names_every_file_of_a_run(self):
    w = '/runs/x'
    self.assertEqual(workdir_lib.checkpoint_dir(w), '/runs/x/checkpoints')
    self.assertEqual(workdir_lib.tensorboard_dir(w), '/runs/x/tb')
    self.assertEqual(workdir_lib.metrics_path(w), '/runs/x/metrics.jsonl')
    self.assertEqual(workdir_lib.train_samples_path(w, 7), '/runs/x/samples_step7.png')
    self.assertEqual(workdir_lib.sample_grid_path(w, 0.8, 3), '/runs/x/samples_t0.8_seed3.png')
    self.assertEqual(workdir_lib.eval_result_path(w, 'test', 5), '/runs/x/eval_test_k5.json')

  def test_round_trip_restores_every_variable_and_stores_the_config(self):
    model = _model(_config())
    workdir = self._dir()
    path = workdir_lib.write_model_checkpoint(workdir, model, step=7)
    self.assertEqual(workdir_lib.checkpoint_model_config(path), model.config)
    restored, step = workdir_lib.restore_model(workdir)
    self.assertEqual(step, 7)
    self.assertTrue(restored.is_initialized)
    for a, b in zip(_values(restored), _values(model)):
      self.assertAllEqual(a, b)

  def test_training_checkpoint_restores_without_its_optimizer(self):
    # Evaluation needs no optimizer slots: a training checkpoint restores the model alone.
    model = _model(_config())
    optimizer = Adamax(learning_rate=1e-3)
    optimizer.build(model.trainable_variables)
    workdir = self._dir()
    workdir_lib.save_model_config(workdir, model.config)
    tf.train.Checkpoint(
      model=model,
      optimizer=optimizer,
      step=tf.Variable(3, dtype=tf.int64),
      model_config=workdir_lib.model_config_variable(model.config),
    ).save(os.path.join(workdir_lib.checkpoint_dir(workdir), 'ckpt'))
    restored, step = workdir_lib.restore_model(workdir)
    self.assertEqual(step, 3)
    for a, b in zip(_values(restored), _values(model)):
      self.assertAllEqual(a, b)

  def test_checkpoint_of_another_config_is_refused(self):
    # issue 10, 5: the checkpoints of a steps_per_unit=2,2 run copied into a 1,1 workdir.
    other = self._dir()
    workdir_lib.write_model_checkpoint(other, _model(_config((2, 2))), step=2)
    workdir = self._dir()
    workdir_lib.write_model_checkpoint(workdir, _model(_config()), step=1)
    shutil.rmtree(workdir_lib.checkpoint_dir(workdir))
    shutil.copytree(workdir_lib.checkpoint_dir(other), workdir_lib.checkpoint_dir(workdir))
    with self.assertRaisesRegex(
      workdir_lib.CheckpointError,
      r'written for a different model config: steps_per_unit \(2, 2\) vs \(1, 1\) \(checkpoint '
      rf'vs {workdir}/model_config.json\)',
    ):
      workdir_lib.restore_model(workdir)

  def test_weight_neutral_fields_may_differ(self):
    workdir = self._dir()
    workdir_lib.write_model_checkpoint(workdir, _model(_config()))
    workdir_lib.save_model_config(workdir, _config(use_recompute_grad=True))
    restored, _ = workdir_lib.restore_model(workdir)
    self.assertTrue(restored.config.use_recompute_grad)

  @parameterized.named_parameters(
    ('bigger_checkpoint', (2, 2), {}, r'69 checkpoint variable\(s\) not in the model \(model/'),
    ('smaller_checkpoint', (1, 1), {'steps_per_unit': (2, 2)}, r'69 variable\(s\) not in the'),
    ('wider_checkpoint', (1, 1), {'coupling_channels': (16, 16)}, r'with another shape \(model/'),
  )
  def test_checkpoint_without_stored_config_is_matched_variable_by_variable(
    self, written, workdir_overrides, pattern
  ):
    workdir = self._dir()
    self._legacy_checkpoint(
      workdir, _model(_config(written)), dataclasses.replace(_config(), **workdir_overrides)
    )
    with self.assertRaisesRegex(workdir_lib.CheckpointError, f'does not match .*{pattern}'):
      workdir_lib.restore_model(workdir)

  @parameterized.named_parameters(
    ('truncated_data', 'data', lambda f: open(f, 'r+b').truncate(os.path.getsize(f) // 2)),
    ('garbage_index', 'index', lambda f: open(f, 'wb').write(b'garbage')),
    ('garbage_state', 'checkpoint', lambda f: open(f, 'w').write('model_checkpoint_path: {')),
  )
  def test_damaged_checkpoint_is_refused_by_name(self, part, damage):
    workdir = self._dir()
    workdir_lib.write_model_checkpoint(workdir, _model(_config()))
    directory = workdir_lib.checkpoint_dir(workdir)
    damage(os.path.join(directory, next(n for n in os.listdir(directory) if part in n)))
    with self.assertRaisesRegex(workdir_lib.CheckpointError, f'{directory}/(ckpt-0|checkpoint)'):
      workdir_lib.restore_model(workdir)

  def test_missing_checkpoint_prefix_is_refused(self):
    workdir = self._dir()
    workdir_lib.write_model_checkpoint(workdir, _model(_config()))
    with self.assertRaisesRegex(FileNotFoundError, r'--checkpoint=/nonexistent/ckpt-3: no such'):
      workdir_lib.restore_model(workdir, '/nonexistent/ckpt-3')

  @parameterized.named_parameters(
    ('not_json', '{"units_per_block": [2, 1', 'not a readable JSON model config'),
    ('not_an_object', '[1, 2]', 'not a model config'),
    ('invalid_value', '{"num_bits": -3}', 'invalid model config: `num_bits`'),
  )
  def test_bad_model_config_file_is_refused_by_name(self, text, message):
    workdir = self._dir()
    with open(os.path.join(workdir, workdir_lib.CONFIG_FILE), 'w') as f:
      f.write(text)
    with self.assertRaisesRegex(workdir_lib.CheckpointError, f'model_config.json: {message}'):
      workdir_lib.load_model_config(workdir)

  def test_nonfinite_weights_are_neither_written_nor_restored(self):
    model = _model(_config())
    weight = model.trainable_variables[0]
    weight.assign(tf.fill(weight.shape, np.inf))
    workdir = self._dir()
    with self.assertRaisesRegex(workdir_lib.CheckpointError, 'Not writing non-finite weights'):
      workdir_lib.write_model_checkpoint(workdir, model)
    self.assertIsNone(workdir_lib.latest_checkpoint(workdir))
    self._legacy_checkpoint(workdir, model, model.config)
    with self.assertRaisesRegex(workdir_lib.CheckpointError, 'holds non-finite weights'):
      workdir_lib.restore_model(workdir)


if __name__ == '__main__':
  tf.test.main()
