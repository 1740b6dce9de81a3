"""Export for TF Serving: per-row contracts, a reload without TFP or Keras, saved_model_cli, CLI.

The SavedModel is written once per test class (setUpClass). Every check of the exported graph runs
in a subprocess that blocks `tf_denseflow`, `tensorflow_probability`, `keras` and `tf_keras` (as TF
Serving has none of them), so a crash there fails the test instead of killing pytest.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import cli_testlib
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

import tf_denseflow as tdf
from tf_denseflow import export, serving, workdir

_IMAGE_SHAPE = (8, 8, 3)
_BATCH = 4

# Runs before the script of every subprocess: blocks the packages a server does not have.
_PRELUDE = """
import sys
BLOCKED = ('tf_denseflow', 'tensorflow_probability', 'keras', 'tf_keras')
for _name in BLOCKED:
  sys.modules[_name] = None  # `import <name>` now raises ImportError
import json
import numpy as np
import tensorflow as tf
ARGS = json.loads(sys.argv[1])

def blocked_imports():
  return sorted(k for k, v in sys.modules.items() if v is not None and k.split('.')[0] in BLOCKED)
"""

_SERVING_SCRIPT = """
# Part 1: values, per-row independence and the op inventory.
import re
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

loaded = tf.saved_model.load(ARGS['dir'])
sigs = loaded.signatures
data = np.load(ARGS['inputs'])

def run(name, **inputs):
  outputs = sigs[name](**{k: tf.constant(v) for k, v in inputs.items()})
  return {k: v.numpy() for k, v in outputs.items()}

images, seed = data['images'], data['seed']
temperature, num_samples = data['temperature'], data['num_importance_samples']
out = {}
elbo = run('serving_default', images=images)
out['elbo'], out['bits_per_dim'] = elbo['elbo'], elbo['bits_per_dim']
out['elbo_again'] = run('serving_default', images=images)['elbo']
out['elbo_row1'] = run('serving_default', images=images[1:2])['elbo']
bound = run('log_prob_bound', images=images, seed=seed, num_importance_samples=num_samples)
out['bound'], out['bound_bits_per_dim'] = bound['log_prob_bound'], bound['bits_per_dim']
out['bound_row1'] = run(
  'log_prob_bound', images=images[1:2], seed=seed[1:2], num_importance_samples=num_samples[1:2]
)['log_prob_bound']
out['samples'] = run('sample', seed=seed, temperature=temperature)['images']
out['samples_again'] = run('sample', seed=seed, temperature=temperature)['images']
out['samples_row1'] = run('sample', seed=seed[1:2], temperature=temperature[1:2])['images']
out['samples_other_seed'] = run('sample', seed=seed + 1000, temperature=temperature)['images']
np.savez(ARGS['out'], **out)

# The op inventory: every node of the graph and of its function library.
saved_model = saved_model_pb2.SavedModel()
with open(ARGS['dir'] + '/saved_model.pb', 'rb') as f:
  saved_model.ParseFromString(f.read())
ops, xla_attrs = set(), []
for meta_graph in saved_model.meta_graphs:
  library = meta_graph.graph_def.library
  nodes = list(meta_graph.graph_def.node)
  for function in library.function:
    nodes += list(function.node_def)
    if function.attr['_XlaMustCompile'].b:
      xla_attrs.append(function.signature.name)
  xla_attrs += [n.name for n in nodes if n.attr['_XlaMustCompile'].b]
  ops |= {n.op for n in nodes} - {f.signature.name for f in library.function}
stateful_random = [
  op for op in ops
  if re.search('Random|Rng|Multinomial|TruncatedNormal|NonDeterministic', op)
  and op_def_registry.get(op) is not None and op_def_registry.get(op).is_stateful
]
report = {
  'signatures': sorted(sigs),
  'ops': sorted(ops),
  'unregistered': sorted(op for op in ops if op_def_registry.get(op) is None),
  'xla_ops': sorted(op for op in ops if op.startswith(('Xla', '_Xla'))),
  'xla_attrs': xla_attrs,
  'stateful_random': sorted(stateful_random),
}
"""

_FUZZ_SCRIPT = """
# Part 2: bad inputs through the TF2 signatures, the restored methods and a TF1 session.

def make(spec):
  return np.full(spec['shape'], spec.get('fill', 0), dtype=spec['dtype'])

def call_session(function, inputs):
  # The session's C++ Run, without the Python client's feed-shape check: what
  # tensorflow_model_server does with a request (it does not check shapes against the signature).
  signature = meta_graph.signature_def[function]
  feeds = {
    graph.get_tensor_by_name(signature.inputs[k].name)._as_tf_output(): v for k, v in inputs.items()
  }
  fetches = [graph.get_tensor_by_name(t.name)._as_tf_output() for t in signature.outputs.values()]
  outputs = session._call_tf_sessionrun(None, feeds, fetches, [], None)
  return dict(zip(signature.outputs.keys(), [tf.constant(o) for o in outputs]))

graph = tf.Graph()
with graph.as_default():
  session = tf.compat.v1.Session(graph=graph)
  meta_graph = tf.compat.v1.saved_model.loader.load(session, ['serve'], ARGS['dir'])

results = {}
for case in ARGS['cases']:
  print('case', case['name'], file=sys.stderr, flush=True)  # the last line names a crash
  inputs = {k: make(v) for k, v in case['inputs'].items()}
  try:
    if case['via'] == 'session':
      outputs = call_session(case['function'], inputs)
    elif case['via'] == 'signature':
      outputs = loaded.signatures[case['function']](**{k: tf.constant(v) for k, v in inputs.items()})
    else:
      outputs = getattr(loaded, case['function'])(**{k: tf.constant(v) for k, v in inputs.items()})
    results[case['name']] = {
      'ok': True,
      'shapes': {k: list(v.shape) for k, v in outputs.items()},
      'dtypes': {k: v.dtype.name for k, v in outputs.items()},
    }
  except Exception as e:  # noqa: BLE001 - every refusal is recorded and checked by the test
    results[case['name']] = {'ok': False, 'type': type(e).__name__, 'message': str(e)[:3000]}
report['blocked_imports'] = blocked_imports()
report['top_level_modules'] = sorted({k.split('.')[0] for k, v in sys.modules.items() if v})
print(json.dumps({'report': report, 'fuzz': results}))
"""


def _fuzz_cases():
  """Bad and edge-case inputs: name -> (via, function, inputs, expected).

  `via` is `signature` (TF2 `signatures[...]`), `method` (the restored `tf.function`s, which
  check the input signature in Python) or `session` (a TF1 session, the path of a model
  server). `expected` is a dict of output shapes (accepted) or a substring of the error.
  """
  h, w, c = _IMAGE_SHAPE
  u8, i64, i32, f32 = 'uint8', 'int64', 'int32', 'float32'

  def t(shape, dtype, fill=0):
    return {'shape': list(shape), 'dtype': dtype, 'fill': fill}

  def bound_inputs(n, images=None, seed=None, num_samples=None):
    return {
      'images': images or t([n, h, w, c], u8),
      'seed': seed or t([n, 2], i64),
      'num_importance_samples': num_samples or t([n], i32, 1),
    }

  def sample_inputs(n, seed=None, temperature=None):
    return {'seed': seed or t([n, 2], i64), 'temperature': temperature or t([n], f32, 1.0)}

  images_shape = f'`images` must have shape [N, {h}, {w}, {c}]'
  seed_shape = '`seed` must have shape [N, 2]'
  batch = 'must have the same batch size'
  # name -> (function, inputs, expected: output shapes, or a substring of the error)
  cases = {
    # serving_default
    'elbo_batch0': ('serving_default', {'images': t([0, h, w, c], u8)}, {'elbo': [0]}),
    'elbo_batch1': ('serving_default', {'images': t([1, h, w, c], u8)}, {'elbo': [1]}),
    'elbo_batch3': ('serving_default', {'images': t([3, h, w, c], u8, 255)}, {}),
    'images_float': ('serving_default', {'images': t([2, h, w, c], f32)}, 'uint8'),
    'images_int32': ('serving_default', {'images': t([2, h, w, c], i32)}, 'uint8'),
    'images_rank3': ('serving_default', {'images': t([h, w, c], u8)}, images_shape),
    'images_rank5': ('serving_default', {'images': t([2, h, w, c, 1], u8)}, images_shape),
    'images_scalar': ('serving_default', {'images': t([], u8)}, images_shape),
    'images_height': ('serving_default', {'images': t([2, h + 2, w, c], u8)}, images_shape),
    'images_channels': ('serving_default', {'images': t([2, h, w, 1], u8)}, images_shape),
    'images_missing': ('serving_default', {}, 'images'),
    'images_extra_input': (
      'serving_default',
      {'images': t([1, h, w, c], u8), 'seed': t([1, 2], i64)},
      'seed',
    ),
    # log_prob_bound
    'bound_batch0': ('log_prob_bound', bound_inputs(0), {'log_prob_bound': [0]}),
    'bound_batch1': ('log_prob_bound', bound_inputs(1), {'log_prob_bound': [1]}),
    'bound_num_samples_0': (
      'log_prob_bound',
      bound_inputs(2, num_samples=t([2], i32, 0)),
      '`num_importance_samples` must be in [1, 4096]',
    ),
    'bound_num_samples_negative': (
      'log_prob_bound',
      bound_inputs(2, num_samples=t([2], i32, -3)),
      '`num_importance_samples` must be in',
    ),
    'bound_num_samples_too_many': (
      'log_prob_bound',
      bound_inputs(1, num_samples=t([1], i32, 5000)),
      '`num_importance_samples` must be in',
    ),
    'bound_num_samples_scalar': (
      'log_prob_bound',
      bound_inputs(1, num_samples=t([], i32, 1)),
      '`num_importance_samples` must have shape [N]',
    ),
    'bound_num_samples_float': (
      'log_prob_bound',
      bound_inputs(1, num_samples=t([1], f32, 1)),
      'int32',
    ),
    'bound_seed_3': ('log_prob_bound', bound_inputs(2, seed=t([2, 3], i64)), seed_shape),
    'bound_seed_rank1': ('log_prob_bound', bound_inputs(2, seed=t([2], i64)), seed_shape),
    'bound_seed_int32': ('log_prob_bound', bound_inputs(2, seed=t([2, 2], i32)), 'int64'),
    'bound_batch_mismatch': ('log_prob_bound', bound_inputs(2, seed=t([3, 2], i64)), batch),
    'bound_num_samples_mismatch': (
      'log_prob_bound',
      bound_inputs(2, num_samples=t([1], i32, 1)),
      batch,
    ),
    'bound_images_rank5': (
      'log_prob_bound',
      bound_inputs(1, images=t([1, h, w, c, 1], u8)),
      images_shape,
    ),
    # sample
    'sample_batch0': ('sample', sample_inputs(0), {'images': [0, h, w, c]}),
    'sample_batch1': ('sample', sample_inputs(1), {'images': [1, h, w, c]}),
    'sample_temperature_0': ('sample', sample_inputs(2, temperature=t([2], f32, 0.0)), {}),
    'sample_extreme_seed': ('sample', sample_inputs(1, seed=t([1, 2], i64, -(2**63))), {}),
    'sample_temperature_negative': (
      'sample',
      sample_inputs(2, temperature=t([2], f32, -0.5)),
      '`temperature` must be finite and >= 0',
    ),
    'sample_temperature_nan': (
      'sample',
      sample_inputs(1, temperature=t([1], f32, float('nan'))),
      '`temperature` must be finite',
    ),
    'sample_temperature_inf': (
      'sample',
      sample_inputs(1, temperature=t([1], f32, float('inf'))),
      '`temperature` must be finite',
    ),
    'sample_temperature_rank2': (
      'sample',
      sample_inputs(2, temperature=t([2, 1], f32, 1.0)),
      '`temperature` must have shape [N]',
    ),
    'sample_temperature_scalar': (
      'sample',
      sample_inputs(1, temperature=t([], f32, 1.0)),
      '`temperature` must have shape [N]',
    ),
    'sample_seed_3': ('sample', sample_inputs(2, seed=t([2, 3], i64)), seed_shape),
    'sample_seed_rank1': ('sample', sample_inputs(2, seed=t([2], i64)), seed_shape),
    'sample_seed_float': ('sample', sample_inputs(1, seed=t([1, 2], f32)), 'int64'),
    'sample_batch_mismatch': ('sample', sample_inputs(2, temperature=t([3], f32, 1.0)), batch),
    'sample_temperature_missing': ('sample', {'seed': t([1, 2], i64)}, 'temperature'),
  }
  # The restored methods (Python callers) check dtype and shape against the input signature
  # before running, with the input's name in the message.
  methods = {
    'method_images_float': ('elbo', {'images': t([2, h, w, c], f32)}, "name='images'"),
    'method_images_rank5': ('elbo', {'images': t([2, h, w, c, 1], u8)}, "name='images'"),
    'method_seed_int32': ('sample', sample_inputs(1, seed=t([1, 2], i32)), "name='seed'"),
    'method_sample_batch1': ('sample', sample_inputs(1), {'images': [1, h, w, c]}),
  }
  # The C++ session path of a model server: shapes are checked by the graph alone.
  session = {
    'session_elbo_batch1': (
      'serving_default',
      {'images': t([1, h, w, c], u8)},
      {'elbo': [1]},
    ),
    'session_images_rank5': ('serving_default', {'images': t([2, h, w, c, 1], u8)}, images_shape),
    'session_images_rank3': ('serving_default', {'images': t([h, w, c], u8)}, images_shape),
    'session_images_float': ('serving_default', {'images': t([1, h, w, c], f32)}, 'uint8'),
    'session_seed_rank1': ('sample', sample_inputs(2, seed=t([2], i64)), seed_shape),
    'session_temperature_rank2': (
      'sample',
      sample_inputs(2, temperature=t([2, 1], f32, 1.0)),
      '`temperature` must have shape [N]',
    ),
    'session_num_samples_scalar': (
      'log_prob_bound',
      bound_inputs(2, num_samples=t([], i32, 3)),
      '`num_importance_samples` must have shape [N]',
    ),
  }
  groups = {'signature': cases, 'method': methods, 'session': session}
  return {
    name: (via, fn, inputs, expected)
    for via, group in groups.items()
    for name, (fn, inputs, expected) in group.items()
  }


def _tiny_model() -> tdf.DenseFlow:
  """A tiny DenseFlow, initialised from data and perturbed so that it is not the identity."""
  config = tdf.DenseFlowConfig.tiny(
    image_shape=_IMAGE_SHAPE,
    units_per_block=(2, 1),
    steps_per_unit=(1, 1),
    coupling_channels=(8, 8),
  )
  model = tdf.DenseFlow(config, seed=3)
  model.initialize(np.random.RandomState(0).randint(0, 256, (8,) + _IMAGE_SHAPE).astype(np.uint8))
  # The last conv of every conditioner is zero-initialised: perturb every weight, and move the
  # batch-norm statistics away from their defaults, so a training-mode batch norm would show.
  rng = np.random.RandomState(1)
  for v in model.trainable_variables:
    v.assign(v + 0.05 * rng.standard_normal(v.shape).astype(np.float32))
  for v in model.non_trainable_keras_variables:
    noise = rng.uniform(0.5, 1.5, v.shape) if 'variance' in v.name else rng.normal(0, 0.1, v.shape)
    v.assign(noise.astype(np.float32))
  return model


def _run_python(script, args, timeout=300) -> dict:
  """Runs `script` after `_PRELUDE` in a fresh interpreter; returns its last stdout line as JSON."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  proc = subprocess.run(
    [sys.executable, '-c', _PRELUDE + textwrap.dedent(script), json.dumps(args)],
    capture_output=True,
    text=True,
    env=env,
    timeout=timeout,
    cwd=tempfile.gettempdir(),
  )
  if proc.returncode != 0:  # a crash (negative rc) names its last case on stderr
    raise AssertionError(f'subprocess failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _saved_model_cli(*args) -> subprocess.CompletedProcess:
  cli = os.path.join(os.path.dirname(sys.executable), 'saved_model_cli')
  command = (
    [cli]
    if os.path.exists(cli)
    else [sys.executable, '-m', 'tensorflow.python.tools.saved_model_cli']
  )
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  return subprocess.run(command + list(args), capture_output=True, text=True, env=env, timeout=300)


def _logmeanexp(values) -> float:
  values = np.asarray(values, np.float64)
  return float(np.logaddexp.reduce(values) - np.log(len(values)))


class ExportTest(tf.test.TestCase, parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix='export_test_')
    cls._server = None
    cls.model = _tiny_model()
    cls.base = os.path.join(cls.root, 'serving')
    cls.version_dir = export.export_saved_model(cls.model, cls.base, step=7)
    rng = np.random.RandomState(2)
    cls.images = rng.randint(0, 256, (_BATCH,) + _IMAGE_SHAPE).astype(np.uint8)
    cls.images[3] = cls.images[0]  # equal images must get an equal elbo
    cls.seed = rng.randint(-(2**40), 2**40, (_BATCH, 2)).astype(np.int64)
    cls.temperature = np.array([1.0, 0.7, 0.0, 1.3], np.float32)
    cls.num_samples = np.array([1, 3, 2, 4], np.int32)
    cls.inputs = os.path.join(cls.root, 'inputs.npz')
    np.savez(
      cls.inputs,
      images=cls.images,
      seed=cls.seed,
      temperature=cls.temperature,
      num_importance_samples=cls.num_samples,
    )
    # What the model itself computes, row by row (a batch of one each): the export's contract.
    model = cls.model
    seeds = serving.content_seeds(cls.images)
    cls.want_elbo = np.concatenate(
      [model.elbo(cls.images[r : r + 1], seed=seeds[r]).numpy() for r in range(_BATCH)]
    )
    cls.want_bound = np.array(
      [
        _logmeanexp(
          [
            model.elbo(
              cls.images[r : r + 1],
              seed=tf.random.experimental.stateless_fold_in(cls.seed[r], s),
            ).numpy()[0]
            for s in range(cls.num_samples[r])
          ]
        )
        for r in range(_BATCH)
      ]
    )
    cls.want_samples = np.concatenate(
      [model.sample(1, seed=cls.seed[r], temperature=cls.temperature[r]) for r in range(_BATCH)]
    )

  @classmethod
  def server_results(cls) -> dict:
    """Runs the serving checks and the fuzz cases in one fresh process, once per class."""
    if cls._server is None:
      cases = [
        {'name': name, 'via': via, 'function': fn, 'inputs': inputs}
        for name, (via, fn, inputs, _) in _fuzz_cases().items()
      ]
      cls.server_out = os.path.join(cls.root, 'serving_out.npz')
      args = {'dir': cls.version_dir, 'inputs': cls.inputs, 'out': cls.server_out, 'cases': cases}
      cls._server = _run_python(_SERVING_SCRIPT + _FUZZ_SCRIPT, args)
    return cls._server

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def assert_samples_match(self, got, want):
    # Pixels within float error of a quantisation boundary may move by one level.
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    self.assertLessEqual(diff.max(), 1)
    self.assertLessEqual(np.count_nonzero(diff), max(1, diff.size // 1000))

  # -----------------------------------------------------------------------------------------------
  # Layout and versions.

  def test_version_layout_and_metadata(self):
    self.assertEqual(self.version_dir, os.path.join(self.base, '1'))
    self.assertEqual(sorted(os.listdir(self.base)), ['1'])  # no temporary directory left
    for name in ('saved_model.pb', 'variables', export.METADATA_FILE):
      self.assertTrue(os.path.exists(os.path.join(self.version_dir, name)), name)
    with open(os.path.join(self.version_dir, export.METADATA_FILE)) as f:
      metadata = json.load(f)
    self.assertEqual(metadata['step'], 7)
    self.assertEqual(metadata['signatures'], ['log_prob_bound', 'sample', 'serving_default'])
    self.assertEqual(tdf.DenseFlowConfig(**metadata['config']), self.model.config)
    self.assertEqual(export.next_version(self.base), 2)

  def test_next_version(self):
    base = os.path.join(self.root, 'versions')
    self.assertEqual(export.next_version(base), 1)
    for name in ('3', '12', 'notes', '.tmp-1234', '7'):
      os.makedirs(os.path.join(base, name))
    self.assertEqual(export.next_version(base), 13)

  def test_refuses_to_overwrite_a_version(self):
    with self.assertRaisesRegex(FileExistsError, 'never overwritten'):
      export.export_saved_model(self.model, self.base, version=1)

  def test_refuses_an_uninitialised_model(self):
    model = tdf.DenseFlow(self.model.config)
    with self.assertRaisesRegex(ValueError, 'not initialised'):
      export.export_saved_model(model, os.path.join(self.root, 'uninitialised'))

  def test_bound_is_the_same_in_any_number_of_chunks(self):
    # 3 (image, draw) pairs per step: one draw of the batch per loop step, so the IWBO streams
    # over 4 chunks, and rows drop out as their own count is reached.
    module = serving.DenseFlowServingModule(self.model, max_rows_per_step=3)
    got = module.log_prob_bound(
      tf.constant(self.images), tf.constant(self.seed), tf.constant(self.num_samples)
    )
    self.assertAllClose(got['log_prob_bound'], self.want_bound, rtol=1e-5, atol=1e-3)

  @parameterized.named_parameters(
    ('max_num_samples', dict(max_num_samples=0)), ('max_rows_per_step', dict(max_rows_per_step=0))
  )
  def test_module_rejects_bad_arguments(self, kwargs):
    with self.assertRaisesRegex(ValueError, list(kwargs)[0]):
      serving.DenseFlowServingModule(self.model, **kwargs)

  def test_export_re_exports_the_serving_module(self):
    # train_lib and older callers import them from tf_denseflow.export.
    self.assertIs(export.DenseFlowServingModule, serving.DenseFlowServingModule)
    self.assertIs(export.content_seeds, serving.content_seeds)

  def test_content_seeds_are_the_documented_fingerprint(self):
    seeds = serving.content_seeds(self.images).numpy()
    fingerprints = tf.fingerprint(self.images).numpy()
    for r in range(_BATCH):
      want = int.from_bytes(fingerprints[r].tobytes(), 'little', signed=True)
      self.assertEqual(seeds[r].tolist(), [want, 0x5EED])
    self.assertEqual(seeds[0].tolist(), seeds[3].tolist())  # equal images
    self.assertNotEqual(seeds[0].tolist(), seeds[1].tolist())

  # -----------------------------------------------------------------------------------------------
  # The SavedModel in a process without tf_denseflow, TFP or Keras.

  def test_serving_without_tfp_or_keras(self):
    report = self.server_results()['report']
    out = np.load(self.server_out)
    self.assertEqual(report['signatures'], ['log_prob_bound', 'sample', 'serving_default'])
    self.assertEqual(report['blocked_imports'], [])
    # serving_default: the model's ELBO with each row's content seed; deterministic.
    self.assertAllClose(out['elbo'], self.want_elbo, rtol=1e-5, atol=1e-3)
    self.assertAllClose(
      out['bits_per_dim'], -self.want_elbo * self.model.config.bits_per_dim_scale, rtol=1e-5
    )
    self.assertAllEqual(out['elbo_again'], out['elbo'])
    self.assertEqual(out['elbo'][0], out['elbo'][3])  # equal images
    self.assertAllClose(out['elbo_row1'], out['elbo'][1:2], rtol=1e-7, atol=1e-5)
    # log_prob_bound: log-mean-exp of the model's ELBOs at fold_in(seed[r], s).
    self.assertAllClose(out['bound'], self.want_bound, rtol=1e-5, atol=1e-3)
    self.assertAllClose(
      out['bound_bits_per_dim'], -self.want_bound * self.model.config.bits_per_dim_scale, rtol=1e-5
    )
    self.assertAllClose(out['bound_row1'], out['bound'][1:2], rtol=1e-6, atol=1e-4)
    # sample: row r is model.sample(1, seed[r], temperature[r]), whatever else is in the batch.
    self.assertEqual(out['samples'].dtype, np.uint8)
    self.assert_samples_match(out['samples'], self.want_samples)
    self.assertAllEqual(out['samples_again'], out['samples'])
    self.assertAllEqual(out['samples_row1'], out['samples'][1:2])  # batch-independent
    self.assertFalse(np.array_equal(out['samples_other_seed'], out['samples']))
    # Only core TF ops: nothing a stock tensorflow_model_server lacks.
    self.assertEqual(report['unregistered'], [])
    self.assertEqual(report['xla_ops'], [])
    self.assertEqual(report['xla_attrs'], [])
    self.assertEqual(report['stateful_random'], [])
    self.assertContainsSubset(['StatelessRandomNormalV2', 'Fingerprint'], report['ops'])

  def test_saved_model_cli_run(self):
    arrays = os.path.join(self.root, 'cli')
    os.makedirs(arrays, exist_ok=True)
    for name in ('images', 'seed', 'temperature'):
      np.save(os.path.join(arrays, f'{name}.npy'), getattr(self, name))
    common = ['--dir', self.version_dir, '--tag_set', 'serve', '--overwrite']
    ran = _saved_model_cli(
      'run',
      *common,
      '--signature_def',
      'serving_default',
      '--inputs',
      f'images={arrays}/images.npy',
      '--outdir',
      f'{arrays}/elbo',
    )
    self.assertEqual(ran.returncode, 0, ran.stderr[-3000:])
    elbo = np.load(f'{arrays}/elbo/elbo.npy')
    self.assertAllClose(elbo, self.want_elbo, rtol=1e-5, atol=1e-3)
    ran = _saved_model_cli(
      'run',
      *common,
      '--signature_def',
      'sample',
      '--inputs',
      f'seed={arrays}/seed.npy;temperature={arrays}/temperature.npy',
      '--outdir',
      f'{arrays}/sample',
    )
    self.assertEqual(ran.returncode, 0, ran.stderr[-3000:])
    self.assert_samples_match(np.load(f'{arrays}/sample/images.npy'), self.want_samples)

  @pytest.mark.slow
  def test_saved_model_cli_show(self):
    shown = _saved_model_cli('show', '--dir', self.version_dir, '--all')
    self.assertEqual(shown.returncode, 0, shown.stderr[-3000:])
    for text in (
      "signature_def['serving_default']",
      "signature_def['log_prob_bound']",
      "signature_def['sample']",
      "inputs['images']",
      "inputs['num_importance_samples']",
      "outputs['elbo']",
      "inputs['temperature']",
      "outputs['bits_per_dim']",
      'DT_UINT8',
      'tensorflow/serving/predict',
    ):
      self.assertIn(text, shown.stdout)

  def test_fuzz_inputs(self):
    results = self.server_results()['fuzz']
    for name, (_, _, _, expected) in _fuzz_cases().items():
      with self.subTest(name):
        result = results[name]
        if isinstance(expected, dict):
          self.assertTrue(result['ok'], result)
          for key, shape in expected.items():
            self.assertEqual(result['shapes'][key], shape)
          if 'images' in result['dtypes']:
            self.assertEqual(result['dtypes']['images'], 'uint8')
        else:
          self.assertFalse(result['ok'], f'{name} was accepted: {result}')
          self.assertIn(result['type'], ('InvalidArgumentError', 'TypeError', 'ValueError'))
          self.assertIn(expected, result['message'])

  # -----------------------------------------------------------------------------------------------
  # The command line, from a training workdir.

  @pytest.mark.slow
  def test_command_line_exports_the_latest_checkpoint(self):
    run_dir = os.path.join(self.root, 'run')
    workdir.write_model_checkpoint(run_dir, self.model, step=5)
    base = os.path.join(self.root, 'cli_serving')
    command = [
      sys.executable,
      '-m',
      'tf_denseflow.export',
      f'--workdir={run_dir}',
      f'--export_dir={base}',
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(proc.stdout.strip().splitlines()[-1], os.path.join(base, '1'))
    with open(os.path.join(base, '1', export.METADATA_FILE)) as f:
      self.assertEqual(json.load(f)['step'], 5)
    # The export holds the model that `workdir.restore_model` rebuilds from the checkpoint.
    restored, _ = workdir.restore_model(run_dir)
    seeds = serving.content_seeds(self.images)
    want = np.concatenate(
      [restored.elbo(self.images[r : r + 1], seed=seeds[r]).numpy() for r in range(_BATCH)]
    )
    loaded = tf.saved_model.load(os.path.join(base, '1'))
    elbo = loaded.signatures['serving_default'](images=tf.constant(self.images))['elbo']
    self.assertAllClose(elbo, want, rtol=1e-5, atol=1e-3)

  @pytest.mark.slow
  def test_command_line_refuses_an_existing_version(self):
    run_dir = os.path.join(self.root, 'run_existing')
    workdir.write_model_checkpoint(run_dir, self.model, step=1)
    proc = subprocess.run(
      [
        sys.executable,
        '-m',
        'tf_denseflow.export',
        f'--workdir={run_dir}',
        f'--export_dir={self.base}',
        '--version=1',
      ],
      capture_output=True,
      text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES=''),
      timeout=300,
    )
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn('never overwritten', proc.stderr)


def _micro_config(**overrides) -> tdf.DenseFlowConfig:
  kwargs = dict(
    units_per_block=(2, 1),
    steps_per_unit=(1, 1),
    coupling_channels=(8, 8),
    use_attention=False,
    dequantization='uniform',
  )
  return tdf.DenseFlowConfig.tiny(_IMAGE_SHAPE, **(kwargs | overrides))


class CommandLineErrorTest(tf.test.TestCase):
  def _dir(self):
    path = tempfile.mkdtemp(prefix='export_cli_test_')
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def test_refuses_non_finite_weights_and_writes_nothing(self):
    model = tdf.DenseFlow(_micro_config())
    model.initialize(np.zeros((2,) + _IMAGE_SHAPE, np.uint8))
    weight = model.trainable_variables[-1]
    weight.assign(tf.fill(weight.shape, np.nan))
    base = os.path.join(self._dir(), 'serving')
    with self.assertRaisesRegex(ValueError, 'Not exporting non-finite weights'):
      export.export_saved_model(model, base)
    self.assertFalse(os.path.exists(os.path.join(base, '1')))

  def test_bad_input_through_main_fails_with_one_line(self):
    # The parser and main of `python -m tf_denseflow.export`, as app.run calls them.
    root = self._dir()
    images = np.random.default_rng(0).integers(0, 256, (4,) + _IMAGE_SHAPE, dtype=np.uint8)

    def run_dir(name, config, initialise=True):
      model = tdf.DenseFlow(config)
      if initialise:
        model.initialize(images)
      path = os.path.join(root, name)
      workdir.write_model_checkpoint(path, model)
      return path

    good = run_dir('good', _micro_config())
    os.makedirs(os.path.join(root, 'serving', '1'))
    # issue 10, 5: the checkpoints of a steps_per_unit=2,2 model in the workdir of a 1,1 model.
    copied = run_dir('copied', _micro_config())
    other = run_dir('other', _micro_config(steps_per_unit=(2, 2)))
    shutil.rmtree(os.path.join(copied, 'checkpoints'))
    shutil.copytree(os.path.join(other, 'checkpoints'), os.path.join(copied, 'checkpoints'))
    bad_json = run_dir('bad_json', _micro_config())
    with open(os.path.join(bad_json, 'model_config.json'), 'w') as f:
      f.write('{')
    wrong_values = run_dir('wrong_values', _micro_config())
    with open(os.path.join(wrong_values, 'model_config.json'), 'w') as f:
      json.dump(dataclasses.asdict(_micro_config()) | {'growth_rate': -2}, f)
    uninitialised = run_dir('uninitialised', _micro_config(), initialise=False)
    export_dir = f'--export_dir={root}/serving'
    cases = {
      'no export_dir': ([f'--workdir={good}'], '--export_dir is required'),
      'zero max_num_samples': ([f'--workdir={good}', export_dir, '--max_num_samples=0'], 'max_num'),
      'negative version': ([f'--workdir={good}', export_dir, '--version=-1'], '--version'),
      'existing version': ([f'--workdir={good}', export_dir, '--version=1'], 'never overwritten'),
      'copied checkpoints': (
        [f'--workdir={copied}', export_dir],
        'written for a different model config: steps_per_unit (2, 2) vs (1, 1)',
      ),
      'config not JSON': ([f'--workdir={bad_json}', export_dir], 'model_config.json: not a'),
      'config values': ([f'--workdir={wrong_values}', export_dir], '`growth_rate` must be >= 0'),
      'uninitialised': ([f'--workdir={uninitialised}', export_dir], 'not initialised'),
      'empty workdir': ([f'--workdir={root}', export_dir], 'No model_config.json'),
    }
    results = cli_testlib.run_cases(
      'tf_denseflow.export:define_export_flags',
      'tf_denseflow.flags:parse_flags',
      'tf_denseflow.export:main',
      [args for args, _ in cases.values()],
    )
    for (name, (_, needle)), result in zip(cases.items(), results):
      with self.subTest(name):
        cli_testlib.assert_one_line_error(self, result, needle)
    self.assertEqual(sorted(os.listdir(os.path.join(root, 'serving'))), ['1'])


if __name__ == '__main__':
  tf.test.main()
