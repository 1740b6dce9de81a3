"""Tests for tf_denseflow.flags and the flagfiles in configs/, parsed by the real absl parser.

Also the command-line contract of `python -m tf_denseflow.train`: bad flags end the program at
start with one `error: ...` line on stderr and exit code 2, never a traceback (run as
subprocesses, in parallel).
"""

import dataclasses
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import cli_testlib
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver, parameterized

from tf_denseflow import data as data_lib
from tf_denseflow import flags as flags_lib
from tf_denseflow import train as train_main
from tf_denseflow import train_lib
from tf_denseflow import workdir as workdir_lib
from tf_denseflow.config import DenseFlowConfig
from tf_denseflow.model import DenseFlow

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(_REPO, 'configs', '*.cfg')))
_EXPERIMENTS = ('cifar10.cfg', 'imagenet32.cfg', 'imagenet64.cfg', 'celeba.cfg')
# Flags every experiment flagfile must state (STYLE.md 2.5: explicit hyper-parameters).
_RESULT_AFFECTING = (
  'dataset',
  'augmentation',
  'model_preset',
  'units_per_block',
  'steps_per_unit',
  'coupling_channels',
  'growth_rate',
  'dense_depth',
  'dense_growth',
  'attention_landmarks',
  'use_attention',
  'attention_tokens',
  'use_cross_unit_coupling',
  'cross_unit_include_previous',
  'squeeze_order',
  'dequantization',
  'global_batch_size',
  'learning_rate',
  'adamax_epsilon',
  'warmup_steps',
  'lr_schedule',
  'lr_decay_gamma',
  'train_steps',
  'finetune_lr',
  'finetune_steps',
  'seed',
)

flags_lib.define_flags()


def _parse(*args):
  """Parses `args` (after the program name) from the repository root; returns the TrainConfig."""
  cwd = os.getcwd()
  os.chdir(_REPO)
  try:
    FLAGS.unparse_flags()
    FLAGS(['train', *args])
    return train_lib.TrainConfig.from_flags(FLAGS)
  finally:
    os.chdir(cwd)


class FlagfileTest(tf.test.TestCase, parameterized.TestCase):
  def tearDown(self):
    FLAGS.unparse_flags()
    super().tearDown()

  def test_configs_exist(self):
    self.assertContainsSubset(
      ['cifar10.cfg', 'imagenet32.cfg', 'imagenet64.cfg', 'celeba.cfg', 'default.cfg', 'smoke.cfg'],
      _CONFIGS,
    )

  @parameterized.parameters(*_CONFIGS)
  @flagsaver.flagsaver
  def test_every_config_parses_and_builds(self, name):
    config = _parse(f'--flagfile=configs/{name}', '--workdir=/tmp/unused')
    self.assertEqual(tuple(config.model.image_shape), data_lib.image_shape(config.data))
    self.assertGreater(config.optim.total_steps, 0)
    if name in _EXPERIMENTS:
      paper = DenseFlowConfig.denseflow_74_10(config.model.image_shape)
      self.assertEqual(config.model, paper)
      self.assertEqual(config.optim.learning_rate, 1e-3)
      self.assertEqual(config.optim.warmup_steps, 5000)
      self.assertEqual(config.optim.finetune_lr, 2e-5)

  @parameterized.parameters(*_EXPERIMENTS)
  def test_experiment_configs_state_every_result_affecting_flag(self, name):
    with open(os.path.join(_REPO, 'configs', name)) as f:
      lines = [line.strip() for line in f if line.startswith('--')]
    stated = {line[2:].split('=', 1)[0] for line in lines}
    stated |= {s[2:] for s in stated if s.startswith('no') and s[2:] in FLAGS}
    self.assertEmpty([n for n in _RESULT_AFFECTING if n not in stated])

  @parameterized.parameters(
    ('cifar10.cfg', 'cifar10', (32, 32, 3), 64, 312_800, 15_640, 'eta'),
    ('imagenet32.cfg', 'imagenet_resized/32x32', (32, 32, 3), 64, 400_380, 40_038, 'eta'),
    ('imagenet64.cfg', 'imagenet_resized/64x64', (64, 64, 3), 32, 400_370, 40_037, 'eta'),
    ('celeba.cfg', 'celeb_a', (64, 64, 3), 32, 254_350, 25_435, 'hflip'),
  )
  @flagsaver.flagsaver
  def test_official_recipes(self, name, dataset, shape, batch, steps, finetune, augmentation):
    config = _parse(f'--flagfile=configs/{name}')
    self.assertEqual(config.data.dataset, dataset)
    self.assertEqual(config.model.image_shape, shape)
    self.assertEqual(config.optim.global_batch_size, batch)
    self.assertEqual((config.optim.train_steps, config.optim.finetune_steps), (steps, finetune))
    self.assertEqual(config.data.augmentation, augmentation)
    self.assertEqual(config.optim.lr_schedule, 'constant')

  @flagsaver.flagsaver
  def test_smoke_derives_from_cifar10(self):
    smoke = _parse('--flagfile=configs/smoke.cfg')
    cifar = _parse('--flagfile=configs/cifar10.cfg')
    self.assertEqual(smoke.optim.train_steps + smoke.optim.finetune_steps, 2)
    # What smoke.cfg does not override comes from cifar10.cfg.
    for name in ('learning_rate', 'adamax_epsilon', 'lr_schedule', 'finetune_lr'):
      self.assertEqual(getattr(smoke.optim, name), getattr(cifar.optim, name))
    self.assertEqual(smoke.data.augmentation, cifar.data.augmentation)
    self.assertEqual(smoke.model.squeeze_order, cifar.model.squeeze_order)
    # The command line overrides the flagfile.
    self.assertEqual(_parse('--flagfile=configs/smoke.cfg', '--train_steps=7').optim.train_steps, 7)

  @flagsaver.flagsaver
  def test_flag_defaults_are_the_cifar10_paper_values(self):
    config = _parse()
    self.assertEqual(config.model, DenseFlowConfig.denseflow_74_10())
    self.assertEqual(config.optim, train_lib.OptimConfig())
    self.assertEqual(config.data, data_lib.DataConfig())
    self.assertEqual(_parse('--flagfile=configs/cifar10.cfg').optim, config.optim)

  @flagsaver.flagsaver
  def test_default_config_is_the_embedded_small_model(self):
    config = _parse(f'--flagfile={train_main.DEFAULT_FLAGFILE}')
    self.assertEqual(config.data.dataset, 'embedded')
    self.assertEqual(config.model.image_shape, (32, 32, 3))
    self.assertLess(DenseFlow(config.model).num_parameters(), 20_000_000)

  @flagsaver.flagsaver
  def test_named_preset_with_explicit_overrides(self):
    config = _parse('--model_preset=small', '--coupling_channels=32,32,32', '--growth_rate=6')
    expected = DenseFlowConfig.small(coupling_channels=(32, 32, 32), growth_rate=6)
    self.assertEqual(config.model, expected)
    # Flags left at their defaults do not override the preset.
    self.assertEqual(_parse('--model_preset=small').model, DenseFlowConfig.small())

  @flagsaver.flagsaver
  def test_custom_preset_uses_every_model_flag(self):
    config = _parse(
      '--model_preset=custom',
      '--units_per_block=3,2,1',
      '--steps_per_unit=1,1,1',
      '--use_recompute_grad',
      '--coupling_dtype=bfloat16',
    )
    expected = dataclasses.replace(
      DenseFlowConfig(),
      units_per_block=(3, 2, 1),
      steps_per_unit=(1, 1, 1),
      use_recompute_grad=True,
      coupling_dtype='bfloat16',
    )
    self.assertEqual(config.model, expected)

  @flagsaver.flagsaver
  def test_export_flag_defaults_to_the_workdir(self):
    self.assertEqual(_parse('--export', '--workdir=/w').export_dir, '/w/export')
    self.assertEqual(_parse('--export_dir=/e', '--workdir=/w').export_dir, '/e')
    self.assertIsNone(_parse('--workdir=/w').export_dir)

  @parameterized.parameters(
    (['--dataset=mnist'], 'Unknown `dataset`'),
    (['--dataset=embedded', '--image_size=36'], 'divisible by 8'),
    (['--model_preset=small', '--units_per_block=1,x'], 'list of ints'),
  )
  @flagsaver.flagsaver
  def test_bad_values_raise_config_errors(self, args, message):
    with self.assertRaisesRegex(train_lib.ConfigError, message):
      _parse(*args)

  @parameterized.named_parameters(
    ('zero_epsilon', '--adamax_epsilon=0', 'adamax_epsilon'),
    ('denormal_epsilon', '--adamax_epsilon=1e-45', 'adamax_epsilon'),
    ('nan_learning_rate', '--learning_rate=nan', 'learning_rate'),
    ('inf_learning_rate', '--learning_rate=inf', 'learning_rate'),
    ('float32_inf_learning_rate', '--learning_rate=1e39', 'learning_rate'),
    ('negative_finetune_lr', '--finetune_lr=-1e-5', 'finetune_lr'),
    ('nan_gamma', '--lr_decay_gamma=nan', 'lr_decay_gamma'),
    ('nan_temperature', '--sample_temperature=nan', 'sample_temperature'),
    ('int64_seed', '--seed=18446744073709551616', 'seed'),
    ('num_bits_above_8', '--num_bits=9', 'num_bits'),
    ('num_bits_zero', '--num_bits=0', 'num_bits'),
    ('int32_batch', '--global_batch_size=4294967296', 'global_batch_size'),
    ('zero_init_examples', '--init_examples=0', 'init_examples'),
    ('negative_init_examples', '--init_examples=-1', 'init_examples'),
    ('huge_train_steps', '--train_steps=9223372036854775808', 'train_steps'),
  )
  @flagsaver.flagsaver
  def test_bad_numbers_fail_at_parse_naming_the_flag(self, arg, name):
    with self.assertRaisesRegex(flags.IllegalFlagValueError, f'flag --{name}='):
      _parse('--flagfile=configs/smoke.cfg', arg)

  @parameterized.named_parameters(
    ('nan_temperature', '--temperature=nan', 'temperature'),
    ('zero_num', '--num=0', 'num'),
    ('zero_chunk', '--chunk_size=0', 'chunk_size'),
    (
      'int32_num_importance_samples',
      '--num_importance_samples=2147483648',
      'num_importance_samples',
    ),
  )
  @flagsaver.flagsaver
  def test_program_flags_refuse_bad_numbers(self, arg, name):
    flags_lib.define_evaluate_flags()
    flags_lib.define_sample_flags()
    with self.assertRaisesRegex(flags.IllegalFlagValueError, f'flag --{name}='):
      FLAGS(['program', arg])

  def test_num_bits_flag_sets_the_model_config(self):
    self.assertEqual(_parse('--flagfile=configs/smoke.cfg').model.num_bits, 8)
    self.assertEqual(_parse('--flagfile=configs/smoke.cfg', '--num_bits=5').model.num_bits, 5)

  def test_init_examples_flag_sets_the_train_config(self):
    self.assertIsNone(_parse('--flagfile=configs/smoke.cfg').init_examples)
    config = _parse('--flagfile=configs/smoke.cfg', '--init_examples=64')
    self.assertEqual(config.init_examples, 64)
    self.assertEqual(config.to_json()['init_examples'], 64)

  def test_default_flagfile_only_without_flagfile_or_dataset(self):
    default = train_main.DEFAULT_FLAGFILE
    self.assertEqual(
      train_main.with_default_flagfile(['train', '--workdir=w']),
      ['train', f'--flagfile={default}', '--workdir=w'],
    )
    for argv in (
      ['train', '--flagfile=configs/cifar10.cfg', '--workdir=w'],
      ['train', '--dataset=cifar10', '--workdir=w'],
      ['train', '--helpfull'],
    ):
      self.assertEqual(train_main.with_default_flagfile(argv), argv)
    with self.assertRaises(FileNotFoundError):
      train_main.with_default_flagfile(['train'], default='/nonexistent/default.cfg')

  def test_define_flags_is_idempotent(self):
    flags_lib.define_flags()
    flags_lib.define_evaluate_flags()
    flags_lib.define_sample_flags()
    self.assertIn('num_importance_samples', FLAGS)


class CommandLineErrorTest(tf.test.TestCase):
  def test_bad_flags_fail_with_one_line(self):
    workdir = tempfile.mkdtemp(prefix='flags_test_')
    # A workdir whose checkpoint has another architecture than smoke.cfg's.
    resume_dir = tempfile.mkdtemp(prefix='flags_test_resume_')
    with flagsaver.flagsaver():
      smoke = _parse('--flagfile=configs/smoke.cfg').model
    FLAGS.unparse_flags()
    workdir_lib.write_model_checkpoint(
      resume_dir, DenseFlow(dataclasses.replace(smoke, coupling_channels=(16, 16)))
    )
    smoke_args = ['--flagfile=configs/smoke.cfg', '--noprogress_bar']
    cases = {
      'unknown dataset': (
        smoke_args + [f'--workdir={workdir}', '--dataset=mnist'],
        "Unknown `dataset` 'mnist'",
      ),
      'batch not divisible': (
        smoke_args + [f'--workdir={workdir}', '--num_cpu_devices=2', '--global_batch_size=3'],
        'not divisible by the 2 replicas',
      ),
      'image size': ([f'--workdir={workdir}', '--image_size=36'], 'divisible by 8'),
      'missing workdir': (smoke_args, '--workdir is required'),
      'architecture changed': (
        smoke_args + [f'--workdir={resume_dir}'],
        'coupling_channels: [16, 16] in the workdir, [8, 8] now',
      ),
      'bad enum': (smoke_args + ['--lr_schedule=cosine'], 'lr_schedule'),
      'zero init_examples': (smoke_args + ['--init_examples=0'], 'flag --init_examples=0'),
    }
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    processes = {
      name: subprocess.Popen(
        [sys.executable, '-m', 'tf_denseflow.train', *args],
        cwd=_REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
      for name, (args, _) in cases.items()
    }
    for name, process in processes.items():
      _, stderr = process.communicate(timeout=240)
      with self.subTest(name):
        errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
        self.assertEqual(process.returncode, 2, stderr)
        self.assertNotIn('Traceback', stderr)
        self.assertLen(errors, 1, stderr)
        self.assertIn(cases[name][1], errors[0])

  def test_bad_input_through_main_fails_with_one_line(self):
    # The parser and main of `python -m tf_denseflow.train`, as app.run calls them.
    root = tempfile.mkdtemp(prefix='flags_test_main_')
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    with flagsaver.flagsaver():
      smoke = _parse('--flagfile=configs/smoke.cfg').model
    FLAGS.unparse_flags()

    def workdir(name, model_config=None, checkpoint_of=None):
      path = os.path.join(root, name)
      if checkpoint_of is not None:
        workdir_lib.write_model_checkpoint(path, DenseFlow(checkpoint_of))
      if model_config is not None:
        workdir_lib.save_model_config(path, model_config)
      os.makedirs(path, exist_ok=True)
      return path

    # issue 10, 5: the checkpoints of a --steps_per_unit=2,2 run in the workdir of a 1,1 run.
    copied = workdir('copied', smoke, dataclasses.replace(smoke, steps_per_unit=(2, 2)))
    truncated = workdir('truncated', checkpoint_of=smoke)
    data = glob.glob(os.path.join(truncated, 'checkpoints', '*.data-*'))[0]
    os.truncate(data, os.path.getsize(data) // 2)
    bad_json = workdir('bad_json')
    with open(os.path.join(bad_json, 'model_config.json'), 'w') as f:
      f.write('{"units_per_block": [2,')
    bad_train_json = workdir('bad_train_json')
    with open(os.path.join(bad_train_json, 'train_config.json'), 'w') as f:
      f.write('[]')
    a_file = os.path.join(root, 'a_file')
    open(a_file, 'w').close()
    base = ['--flagfile=configs/smoke.cfg', '--noprogress_bar', '--steps_per_epoch=1']
    cases = {
      'zero epsilon': (['--adamax_epsilon=0', f'--workdir={root}/w'], '--adamax_epsilon'),
      'nan learning rate': (['--learning_rate=nan', f'--workdir={root}/w'], '--learning_rate'),
      'num_bits': (['--num_bits=9', f'--workdir={root}/w'], '--num_bits'),
      'seed': ([f'--seed={2**64}', f'--workdir={root}/w'], '--seed'),
      'copied checkpoints': (
        [f'--workdir={copied}'],
        'written for a different model config: steps_per_unit (2, 2) vs (1, 1)',
      ),
      'truncated checkpoint': ([f'--workdir={truncated}'], 'checkpoints/ckpt-0'),
      'model config not JSON': ([f'--workdir={bad_json}'], 'model_config.json: not a readable'),
      'train config not an object': ([f'--workdir={bad_train_json}'], 'train_config.json'),
      'workdir is a file': ([f'--workdir={a_file}'], f'--workdir={a_file}'),
    }
    results = cli_testlib.run_cases(
      'tf_denseflow.flags:define_flags',
      'tf_denseflow.train:_parse',
      'tf_denseflow.train:main',
      [base + args for args, _ in cases.values()],
    )
    for (name, (_, needle)), result in zip(cases.items(), results):
      with self.subTest(name):
        cli_testlib.assert_one_line_error(self, result, needle)


if __name__ == '__main__':
  tf.test.main()
