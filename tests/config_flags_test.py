"""Tests for tf_denseflow.config_flags: the flags generated from the config dataclasses.

Every config field that is a flag has the field default as its flag default, so the two cannot
drift, and every choice tuple is defined once in the package.
"""

import ast
import collections
import dataclasses
import glob
import os
from typing import Optional, Tuple

import tensorflow as tf
from absl import flags
from absl.testing import parameterized

from tf_denseflow import config_flags, train_lib
from tf_denseflow import data as data_lib
from tf_denseflow import flags as flags_lib
from tf_denseflow.config import DenseFlowConfig

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIGS = (
  DenseFlowConfig,
  train_lib.OptimConfig,
  train_lib.TrainConfig,
  data_lib.DataConfig,
)
# Fields that are no generated flag: not settings of a run, or a flag shared by the programs
# (`--data_dir`, flags.py); the data seed is fixed, `--seed` is the TrainConfig's.
_NOT_FLAGS = {
  'DenseFlowConfig': {'image_shape'},
  'OptimConfig': set(),
  'TrainConfig': {'model', 'data', 'optim'},
  'DataConfig': {'cache', 'data_dir', 'seed'},
}
# Copies of a choice tuple left in modules that another change owns (to be imported instead).
_KNOWN_COPIES = set()

flags_lib.define_flags()


@dataclasses.dataclass(frozen=True)
class _Toy:
  count: int = config_flags.hparam(3, 'A count.', minimum=1, maximum=10)
  rate: float = config_flags.hparam(0.5, 'A rate.', minimum=0.0, exclusive_minimum=True)
  mode: str = config_flags.hparam('a', 'A mode.', choices=('a', 'b'))
  name: Optional[str] = config_flags.hparam(None, 'A name.')
  sizes: Tuple[int, ...] = config_flags.hparam((1, 2), 'Sizes.')
  on: bool = config_flags.hparam(False, 'A switch.')
  hidden: int = 7

  def __post_init__(self):
    config_flags.check_fields(self)


class GeneratedFlagsTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters(*_CONFIGS)
  def test_flag_defaults_are_the_field_defaults(self, cls):
    flag_fields = config_flags.flag_fields(cls)
    self.assertNotEmpty(flag_fields)
    for flag_name, field_name in flag_fields.items():
      field = {f.name: f for f in dataclasses.fields(cls)}[field_name]
      with self.subTest(f'{cls.__name__}.{field_name}'):
        self.assertIn(flag_name, FLAGS)
        default = FLAGS[flag_name].default
        if isinstance(field.default, tuple):
          default = tuple(int(v) for v in default)
        self.assertEqual(default, field.default)
        self.assertEndsWith(FLAGS[flag_name].help, field.metadata['help'])  # enum: <a|b>: ...

  @parameterized.parameters(*_CONFIGS)
  def test_every_field_but_the_known_ones_is_a_flag(self, cls):
    fields = {f.name for f in dataclasses.fields(cls)}
    self.assertEqual(fields - set(config_flags.flag_fields(cls).values()), _NOT_FLAGS[cls.__name__])

  def test_model_flags_are_the_config_fields(self):
    fields = [f.name for f in dataclasses.fields(DenseFlowConfig) if f.name != 'image_shape']
    self.assertEqual(list(flags_lib.MODEL_FLAGS.values()), fields)
    self.assertIn('use_recompute_grad', FLAGS)
    self.assertNotIn('recompute_grad', flags_lib.MODEL_FLAGS)

  def test_toy_dataclass_round_trip(self):
    flag_values = flags.FlagValues()
    names = config_flags.define_from_dataclass(_Toy, flag_values=flag_values)
    self.assertEqual(names, ['count', 'rate', 'mode', 'name', 'sizes', 'on'])
    flag_values(['prog', '--count=4', '--sizes=3,4,5', '--mode=b', '--on'])
    values = config_flags.values_from_flags(_Toy, flag_values)
    self.assertEqual(_Toy(**values), _Toy(count=4, mode='b', sizes=(3, 4, 5), on=True))
    explicit = config_flags.values_from_flags(_Toy, flag_values, explicit_only=True)
    self.assertEqual(set(explicit), {'count', 'mode', 'sizes', 'on'})

  @parameterized.parameters(
    ('--count=11', 'count'),
    ('--count=0', 'count'),
    ('--rate=0', 'rate'),
    ('--rate=nan', 'rate'),
    ('--rate=1e39', 'rate'),
    ('--mode=c', 'mode'),
  )
  def test_toy_bounds_at_parse(self, arg, name):
    flag_values = flags.FlagValues()
    config_flags.define_from_dataclass(_Toy, flag_values=flag_values)
    with self.assertRaisesRegex(flags.IllegalFlagValueError, f'--{name}'):
      flag_values(['prog', arg])

  def test_toy_bounds_in_the_config(self):
    for kwargs, name in (
      ({'count': 11}, 'count'),
      ({'rate': 0.0}, 'rate'),
      ({'mode': 'c'}, 'mode'),
    ):
      with self.assertRaisesRegex(ValueError, f'--{name}'):
        _Toy(**kwargs)

  def test_bad_int_list(self):
    flag_values = flags.FlagValues()
    config_flags.define_from_dataclass(_Toy, flag_values=flag_values)
    flag_values(['prog', '--sizes=1,x'])
    with self.assertRaisesRegex(ValueError, '--sizes must be a comma-separated list of ints'):
      config_flags.values_from_flags(_Toy, flag_values)


class ChoiceTuplesTest(tf.test.TestCase):
  def test_no_choice_tuple_is_defined_twice(self):
    """A module-level tuple of strings (choices, names) is defined once, imported elsewhere."""
    definitions = collections.defaultdict(list)
    for path in sorted(
      glob.glob(os.path.join(_REPO, 'tf_denseflow', '**', '*.py'), recursive=True)
    ):
      with open(path) as f:
        tree = ast.parse(f.read())
      relative = os.path.relpath(path, _REPO)
      for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)):
          continue
        value = node.value
        if not isinstance(value, (ast.Tuple, ast.List)) or len(value.elts) < 2:
          continue
        if not all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts):
          continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
          if isinstance(target, ast.Name) and (relative, target.id) not in _KNOWN_COPIES:
            definitions[frozenset(e.value for e in value.elts)].append(f'{relative}:{target.id}')
    self.assertNotEmpty(definitions)
    self.assertEmpty({tuple(sorted(k)): v for k, v in definitions.items() if len(v) > 1})


if __name__ == '__main__':
  tf.test.main()
