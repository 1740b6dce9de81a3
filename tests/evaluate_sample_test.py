"""Tests for tf_denseflow.evaluate, tf_denseflow.sample and tf_denseflow.summaries.

The CLIs run as subprocesses on a workdir trained for one step by the real loop, on the embedded
dataset built at 8x8 (real TFDS records, no mocks).
"""

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import cli_testlib
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image

from tf_denseflow import data as data_lib
from tf_denseflow import evaluate, summaries, train_lib
from tf_denseflow import workdir as workdir_lib
from tf_denseflow.config import DenseFlowConfig
from tf_denseflow.model import DenseFlow

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')


def _run(module, *args):
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=_REPO,
    env=_ENV,
    capture_output=True,
    text=True,
    timeout=300,
  )


class EvaluateSampleTest(tf.test.TestCase, parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix='evaluate_sample_test_')
    data_dir = os.path.join(cls.root, 'tfds')
    data_lib.build_embedded_dataset(data_dir, image_size=8, num_train=32, num_test=10)
    cls.workdir = os.path.join(cls.root, 'run')
    cls.model_config = DenseFlowConfig.tiny(
      (8, 8, 3),
      units_per_block=(2, 1),
      steps_per_unit=(1, 1),
      coupling_channels=(8, 8),
      use_attention=False,
    )
    config = train_lib.TrainConfig(
      model=cls.model_config,
      data=data_lib.DataConfig(
        dataset='embedded',
        data_dir=data_dir,
        image_size=8,
        embedded_num_train=32,
        embedded_num_test=10,
        shuffle_buffer=32,
      ),
      optim=train_lib.OptimConfig(global_batch_size=4, train_steps=1, finetune_steps=0),
      eval_examples=0,
      num_grid_samples=0,
      progress_bar=False,
    )
    cls.train_config = config
    train_lib.train(config, cls.workdir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def test_evaluate_cli_writes_the_iwbo(self):
    output = os.path.join(self.root, 'iwbo.json')
    result = _run(
      'tf_denseflow.evaluate',
      f'--workdir={self.workdir}',
      '--num_importance_samples=3',
      '--chunk_size=2',
      '--batch_size=4',
      '--max_examples=6',
      f'--output={output}',
    )
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn('test bits/dim: ', result.stdout)
    with open(output) as f:
      record = json.load(f)
    self.assertEqual(record['num_examples'], 6)  # 2 batches of 4, 2 padded images masked out
    self.assertEqual(
      (record['num_importance_samples'], record['bound'], record['step']), (3, 'iwbo', 1)
    )
    self.assertEqual(record['dataset'], 'embedded')
    self.assertBetween(record['bits_per_dim'], 1.0, 16.0)

  def test_evaluate_matches_the_elbo_of_the_model(self):
    # K=1 is the single-sample ELBO; the bound of each example does not depend on the padding.
    first = evaluate.evaluate_workdir(
      self.workdir,
      1,
      batch_size=4,
      max_examples=6,
      progress_bar=False,
      output=os.path.join(self.root, 'k1_a.json'),
    )
    again = evaluate.evaluate_workdir(
      self.workdir,
      1,
      batch_size=4,
      max_examples=6,
      progress_bar=False,
      output=os.path.join(self.root, 'k1_b.json'),
    )
    self.assertEqual(first['num_examples'], 6)
    self.assertEqual(first['bits_per_dim'], again['bits_per_dim'])  # stateless seeds
    self.assertTrue(os.path.exists(os.path.join(self.root, 'k1_a.json')))

    # The training run's own evaluation of the same checkpoint (same seed stream, batch size and
    # examples; resumed at its last step, so no step runs) gives the same number.
    copy = os.path.join(self.root, 'run_copy')
    shutil.copytree(self.workdir, copy)
    config = dataclasses.replace(self.train_config, eval_examples=6, eval_batch_size=4)
    trained = train_lib.train(config, copy)
    self.assertEqual((trained.start_step, trained.step), (1, 1))
    self.assertAllClose(trained.test_bpd, first['bits_per_dim'], rtol=1e-5)

  def test_sample_cli_writes_a_png_grid(self):
    out = os.path.join(self.root, 'grid.png')
    result = _run(
      'tf_denseflow.sample',
      f'--workdir={self.workdir}',
      '--num=6',
      '--columns=3',
      '--temperature=0.7',
      '--seed=3',
      f'--out={out}',
    )
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertEqual(result.stdout.strip().splitlines()[-1], out)
    with Image.open(out) as image:
      self.assertEqual(image.size, (3 * 9 + 1, 2 * 9 + 1))  # 8x8 images, 1 px padding
      self.assertEqual(image.mode, 'RGB')

  def test_cli_errors_are_one_line(self):
    empty = tempfile.mkdtemp(dir=self.root)
    processes = [
      ('tf_denseflow.evaluate', ['--num_importance_samples=2'], '--workdir is required'),
      ('tf_denseflow.evaluate', [f'--workdir={empty}'], 'train_config.json'),
      ('tf_denseflow.sample', [f'--workdir={empty}'], 'No model_config.json'),
    ]
    running = [
      (
        subprocess.Popen(
          [sys.executable, '-m', module, *args],
          cwd=_REPO,
          env=_ENV,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
        ),
        message,
      )
      for module, args, message in processes
    ]
    for process, message in running:
      _, stderr = process.communicate(timeout=300)
      with self.subTest(message):
        errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
        self.assertEqual(process.returncode, 2, stderr)
        self.assertNotIn('Traceback', stderr)
        self.assertLen(errors, 1, stderr)
        self.assertIn(message, errors[0])

  def _damaged_workdirs(self):
    """Copies of the trained workdir, each damaged in one way; name -> path."""
    root = tempfile.mkdtemp(dir=self.root)

    def copy(name):
      path = os.path.join(root, name)
      shutil.copytree(self.workdir, path)
      return path

    # issue 10, 5: the checkpoints of a steps_per_unit=2,2 model in the workdir of the 1,1 run.
    copied = copy('copied')
    other = os.path.join(root, 'other')
    wider = DenseFlow(dataclasses.replace(self.model_config, steps_per_unit=(2, 2)))
    workdir_lib.write_model_checkpoint(other, wider, step=1)
    shutil.rmtree(os.path.join(copied, 'checkpoints'))
    shutil.copytree(os.path.join(other, 'checkpoints'), os.path.join(copied, 'checkpoints'))
    truncated = copy('truncated')
    data = glob.glob(os.path.join(truncated, 'checkpoints', 'ckpt-1.data-*'))[0]
    os.truncate(data, os.path.getsize(data) // 2)
    bad_json = copy('bad_json')
    with open(os.path.join(bad_json, 'model_config.json'), 'w') as f:
      f.write('{"units_per_block": [2, 1],')
    bad_train_json = copy('bad_train_json')
    with open(os.path.join(bad_train_json, 'train_config.json'), 'w') as f:
      f.write('not json')
    return {
      'copied': copied,
      'truncated': truncated,
      'bad_json': bad_json,
      'bad_train_json': bad_train_json,
      'dir': root,
    }

  def test_bad_input_through_main_fails_with_one_line(self):
    # The parser and main of `python -m tf_denseflow.evaluate` / `sample`, as app.run calls them.
    dirs = self._damaged_workdirs()
    good = f'--workdir={self.workdir}'
    mismatch = 'written for a different model config: steps_per_unit (2, 2) vs (1, 1)'
    evaluate_cases = {
      'zero num_importance_samples': (
        [good, '--num_importance_samples=0'],
        '--num_importance_samples',
      ),
      'negative chunk': ([good, '--chunk_size=-1'], '--chunk_size'),
      'int64 seed': ([good, f'--seed={2**63}'], '--seed'),
      'copied checkpoints': (
        [f'--workdir={dirs["copied"]}', '--num_importance_samples=1'],
        mismatch,
      ),
      'truncated': ([f'--workdir={dirs["truncated"]}'], 'checkpoints/ckpt-1'),
      'config not JSON': ([f'--workdir={dirs["bad_json"]}'], 'model_config.json: not a'),
      'train config not JSON': ([f'--workdir={dirs["bad_train_json"]}'], 'train_config.json'),
      'no such checkpoint': ([good, '--checkpoint=/nonexistent/ckpt-9'], '/nonexistent/ckpt-9'),
    }
    sample_cases = {
      'nan temperature': ([good, '--temperature=nan'], '--temperature'),
      'zero num': ([good, '--num=0'], '--num'),
      'copied checkpoints': ([f'--workdir={dirs["copied"]}'], mismatch),
      'truncated': ([f'--workdir={dirs["truncated"]}'], 'checkpoints/ckpt-1'),
      'config not JSON': ([f'--workdir={dirs["bad_json"]}'], 'model_config.json: not a'),
      'out is a directory': ([good, '--num=1', f'--out={dirs["dir"]}'], dirs['dir']),
    }
    for program, cases in (('evaluate', evaluate_cases), ('sample', sample_cases)):
      results = cli_testlib.run_cases(
        f'tf_denseflow.flags:define_{program}_flags',
        'tf_denseflow.flags:parse_flags',
        f'tf_denseflow.{program}:main',
        [args + ['--noprogress_bar'] * (program == 'evaluate') for args, _ in cases.values()],
      )
      for (name, (_, needle)), result in zip(cases.items(), results):
        with self.subTest(f'{program}: {name}'):
          cli_testlib.assert_one_line_error(self, result, needle)


class ImageGridTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters((5, None, 3, 2), (6, 2, 2, 3), (1, None, 1, 1))
  def test_grid_layout(self, n, columns, expected_columns, expected_rows):
    images = np.arange(n * 4 * 5 * 3, dtype=np.int64).reshape([n, 4, 5, 3]).astype(np.uint8)
    grid = summaries.image_grid(images, columns)
    self.assertEqual(grid.shape, (expected_rows * 5 + 1, expected_columns * 6 + 1, 3))
    self.assertAllEqual(grid[1:5, 1:6], images[0])
    self.assertAllEqual(grid[0], np.full([grid.shape[1], 3], 255))

  @parameterized.parameters(
    (np.zeros([0, 4, 4, 3], np.uint8),), (np.zeros([4, 4, 3], np.uint8),), (np.zeros([1, 2, 2, 3]),)
  )
  def test_bad_images(self, images):
    with self.assertRaises(ValueError):
      summaries.image_grid(images)

  def test_save_png_round_trip(self):
    image = np.random.default_rng(0).integers(0, 256, [7, 9, 3], dtype=np.uint8)
    path = summaries.save_png(image, os.path.join(tempfile.mkdtemp(), 'sub', 'x.png'))
    with Image.open(path) as loaded:
      self.assertAllEqual(np.asarray(loaded), image)

  def test_tensorboard_events_are_written_without_the_tensorboard_package(self):
    logdir = tempfile.mkdtemp()
    writer = tf.summary.create_file_writer(logdir)
    summaries.write_scalars(writer, {'train/bits_per_dim': 3.5}, step=7)
    summaries.write_image_grid(writer, 'samples', np.zeros([4, 2, 2, 3], np.uint8), step=7)
    events = tf.compat.v1.train.summary_iterator(os.path.join(logdir, os.listdir(logdir)[0]))
    values = {v.tag: v for e in events for v in e.summary.value}
    self.assertEqual(values['train/bits_per_dim'].metadata.plugin_data.plugin_name, 'scalars')
    self.assertAllClose(tf.make_ndarray(values['train/bits_per_dim'].tensor), 3.5)
    self.assertEqual(values['samples'].metadata.plugin_data.plugin_name, 'images')


if __name__ == '__main__':
  tf.test.main()
