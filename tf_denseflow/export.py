"""Export a DenseFlow as a TF Serving SavedModel: plain-TF signatures, randomness drawn per row.

```
python -m tf_denseflow.export --workdir=runs/in64 --export_dir=serving/denseflow [--version=N]
tensorflow_model_server --model_base_path=$PWD/serving/denseflow --model_name=denseflow
```
writes `EXPORT_DIR/<version>/` (`saved_model.pb`, `variables/`, `assets.extra/denseflow.json`)
from the workdir's latest checkpoint. Signatures (all inputs batched, so REST row format works):
```
serving_default  images uint8 [N,H,W,C]                             -> log_prob, bits_per_dim [N]
log_prob_bound   images, seed int64 [N,2], num_samples int32 [N]    -> log_prob_bound, bits_per_dim
sample           seed int64 [N,2], temperature float32 [N]          -> images uint8 [N,H,W,C]
```
Each row is a function of that row's inputs alone, never of the other rows of its batch: the
noise of row `r` comes from its own seed, exactly as the model draws it for a batch of one:
```
serving_default[r] == model.elbo(images[r:r+1], seed=content_seeds(images)[r])
log_prob_bound[r]  == log mean_{s < num_samples[r]} exp(model.elbo(images[r:r+1],
                                                                  seed=fold_in(seed[r], s)))
sample[r]          == model.sample(1, seed=seed[r], temperature=temperature[r])
```
(`fold_in` is `tf.random.experimental.stateless_fold_in`.) The graph holds only core TF ops:
stateless random ops, no `jit_compile`, no TFP or Keras at load time.

Grcic, Grubisic, Segvic. Densely connected normalizing flows. NeurIPS 2021.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf
from absl import app, flags, logging

from tf_denseflow import checks
from tf_denseflow import flags as flags_lib
from tf_denseflow import workdir as workdir_lib
from tf_denseflow.model import DenseFlow

__all__ = [
  'DenseFlowServingModule',
  'METADATA_FILE',
  'content_seeds',
  'define_export_flags',
  'export_saved_model',
  'next_version',
]

METADATA_FILE = os.path.join('assets.extra', 'denseflow.json')
_SERVING_SEED_SALT = 0x5EED  # second word of every serving_default seed
_VERSION_RE = re.compile(r'^\d+$')
_INT64_MAX = 2**63 - 1

FLAGS = flags.FLAGS


def content_seeds(images: tf.Tensor) -> tf.Tensor:
  """Per-row stateless seeds `[N, 2]` int64 from the images' bytes (serving_default's noise).

  ```
  seed[r] = [farmhash64(bytes of images[r]) as int64, 0x5EED]
  ```
  Equal images get equal seeds (so equal `log_prob`), distinct images independent noise.
  `tf.fingerprint` is documented as stable across platforms; the 8 bytes are assembled
  little-endian with integer ops, so the seed does not depend on the host byte order either.
  """
  fingerprint = tf.cast(tf.fingerprint(images), tf.int64)  # [N, 8] bytes
  shifts = tf.constant([8 * k for k in range(8)], tf.int64)
  hashes = tf.reduce_sum(tf.bitwise.left_shift(fingerprint, shifts), axis=1)  # [N]
  return tf.stack([hashes, tf.fill(tf.shape(hashes), tf.constant(_SERVING_SEED_SALT, tf.int64))], 1)


def _runtime_shape(x: tf.Tensor) -> tf.Tensor:
  """`tf.shape(x)` hidden from static shape inference.

  TF Serving does not check request tensors against the signature's shapes (tensorflow/serving
  #1436, #1527), and Grappler folds checks of `tf.shape(x)` against the *declared* shape (a
  rank-5 tensor fed to a rank-4 input passes `tf.rank(x) == 4`). A serialize/parse round trip of
  the shape vector (a few bytes) has an unknown static shape, so the checks below run on what was
  actually fed.
  """
  return tf.io.parse_tensor(tf.io.serialize_tensor(tf.shape(x, out_type=tf.int64)), tf.int64)


def _shape_text(dims: Sequence[Optional[int]]) -> str:
  return '[' + ', '.join('N' if d is None else str(d) for d in dims) + ']'


def _check_inputs(inputs: Dict[str, Tuple[tf.Tensor, Sequence[Optional[int]]]]) -> List[tf.Tensor]:
  """Checks each input's runtime shape and the shared batch size; returns the checked inputs.

  Args:
    inputs: name -> (tensor, dims), `None` marking the batch dimension (always dimension 0).

  Returns:
    The tensors, in order, as identities that run after the checks, so a bad input is reported
    by name before any model op can fail on it.
  """
  checks, batches = [], []
  for name, (x, dims) in inputs.items():
    shape = _runtime_shape(x)
    rank = len(dims)
    padded = tf.concat([shape, tf.fill([rank], tf.constant(-1, tf.int64))], 0)[:rank]
    ok = tf.equal(tf.size(shape), rank)
    for i, d in enumerate(dims):
      if d is not None:
        ok = tf.logical_and(ok, tf.equal(padded[i], d))
    checks.append(
      tf.debugging.Assert(
        ok, [f'`{name}` must have shape {_shape_text(dims)}, got shape', shape], summarize=8
      )
    )
    batches.append(padded[0])
  names = list(inputs)
  with tf.control_dependencies(checks):
    for name, batch in zip(names[1:], batches[1:]):
      checks.append(
        tf.debugging.Assert(
          tf.equal(batch, batches[0]),
          [f'`{names[0]}` and `{name}` must have the same batch size N, got', batches[0], batch],
        )
      )
  with tf.control_dependencies(checks):
    return [tf.identity(x) for x, _ in inputs.values()]


def _checked(x: tf.Tensor, ok: tf.Tensor, message: str) -> tf.Tensor:
  """`x`, after an assertion that `ok` holds (the error shows `message` and `x`)."""
  with tf.control_dependencies([tf.debugging.Assert(ok, [message, x])]):
    return tf.identity(x)


class _Untracked:
  """Holds an object outside the SavedModel's object graph (not a `Trackable`)."""

  def __init__(self, value):
    self.value = value


def _export_variables(model: DenseFlow) -> List[tf.Variable]:
  """Every variable of `model` as a plain `tf.Variable`: Keras 3 variables unwrapped.

  A Keras 3 variable exports as a *copy* of its `tf.Variable` (`_export_to_saved_model_graph`
  in keras/src/backend/tensorflow/core.py). TF1-style loaders (TF Serving, `saved_model_cli
  run`) restore that copy, not the variable the signatures read, and fail with "Could not find
  variable ...". Tracking the underlying `tf.Variable`s directly (and not the model object) gives
  one restored variable per weight, the one the functions capture.
  """
  found, seen = [], set()
  for v in list(model.variables) + model.trainable_variables + model.non_trainable_keras_variables:
    v = v if isinstance(v, tf.Variable) else v.value
    if not isinstance(v, tf.Variable):
      raise TypeError(f'Cannot export variable {v!r}: not a tf.Variable nor a Keras variable.')
    if id(v) not in seen:
      seen.add(id(v))
      found.append(v)
  return found


class DenseFlowServingModule(tf.Module):
  """The export module: a DenseFlow behind three plain-TF signatures with per-row randomness.

  Methods (each a `tf.function` with an explicit input signature; the SavedModel's signatures
  `serving_default`, `log_prob_bound` and `sample` are these functions):
  - `log_prob(images)` -> `{'log_prob', 'bits_per_dim'}`: the single-sample ELBO (nats, a lower
    bound of log P(images)) with the noise seeded by `content_seeds(images)`: deterministic.
  - `log_prob_bound(images, seed, num_samples)` -> `{'log_prob_bound', 'bits_per_dim'}`: the
    importance-weighted bound with `num_samples[r]` draws for row r, draw s seeded by
    `stateless_fold_in(seed[r], s)`. Rows may ask for different numbers of draws.
  - `sample(seed, temperature)` -> `{'images'}`: one uint8 sample per row.

  The batch norms run in inference mode (the model's default). Value checks (`temperature` finite
  and >= 0, `1 <= num_samples <= max_num_samples`, equal batch sizes, and every input's shape,
  checked on the tensor actually fed) raise `InvalidArgumentError` naming the input.

  Args:
    model: an initialised `DenseFlow`.
    max_num_samples: the most draws one row of `log_prob_bound` may request.
    max_rows_per_step: `log_prob_bound` evaluates about this many (image, draw) pairs per loop
      step (at least one draw of the whole batch), to bound memory.
  """

  def __init__(
    self,
    model: DenseFlow,
    max_num_samples: int = 4096,
    max_rows_per_step: int = 64,
    name: str = 'denseflow_serving',
  ):
    super().__init__(name=name)
    if not isinstance(model, DenseFlow):
      raise TypeError(f'`model` must be a DenseFlow, got {type(model).__name__}.')
    if int(max_num_samples) < 1:
      raise ValueError(f'`max_num_samples` must be >= 1, got {max_num_samples}.')
    if int(max_rows_per_step) < 1:
      raise ValueError(f'`max_rows_per_step` must be >= 1, got {max_rows_per_step}.')
    self._model = _Untracked(model)
    self.model_variables = _export_variables(model)
    self._max_num_samples = int(max_num_samples)
    self._max_rows_per_step = int(max_rows_per_step)
    self._image_dims = (None,) + tuple(model.config.image_shape)
    images = tf.TensorSpec(self._image_dims, tf.uint8, name='images')
    seed = tf.TensorSpec([None, 2], tf.int64, name='seed')
    num_samples = tf.TensorSpec([None], tf.int32, name='num_samples')
    temperature = tf.TensorSpec([None], tf.float32, name='temperature')
    self.log_prob = tf.function(self._log_prob, input_signature=[images], autograph=False)
    self.log_prob_bound = tf.function(
      self._log_prob_bound, input_signature=[images, seed, num_samples], autograph=False
    )
    self.sample = tf.function(self._sample, input_signature=[seed, temperature], autograph=False)

  @property
  def model(self) -> DenseFlow:
    """The exported model (not itself part of the SavedModel's object graph)."""
    return self._model.value

  @property
  def signatures(self) -> Dict[str, tf.types.experimental.GenericFunction]:
    """Signature name -> function, for `tf.saved_model.save(..., signatures=...)`."""
    return {
      'serving_default': self.log_prob,
      'log_prob_bound': self.log_prob_bound,
      'sample': self.sample,
    }

  # ---------------------------------------------------------------------------------------------
  # Per-row noise: the model's own derivation (`DenseFlow.log_likelihood_terms`,
  # `DenseFlow.sample_latents`) for a batch of one, mapped over the rows' seeds.

  def _draw_row_noise(self, seed: tf.Tensor):
    """The dequantization and augmentation noise of one row, from its seed `[2]` int64."""
    config = self.model.config
    seed_u, seed_noise = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if config.dequantization == 'variational':
      u = tf.random.stateless_normal(self.model.dequantizer.noise_shape, seed=seed_u)
    else:
      u = tf.random.stateless_uniform(config.image_shape, seed=seed_u)
    shapes = config.noise_shapes()
    seeds = tf.random.experimental.stateless_split(seed_noise, max(1, len(shapes)))
    return u, [tf.random.stateless_normal(s, seed=seeds[k]) for k, s in enumerate(shapes)]

  def _row_noise(self, seeds: tf.Tensor):
    """Noise for each row of `seeds [M, 2]`: `(dequant_noise [M, ...], [noise_k [M, ...]])`."""
    config = self.model.config
    u_shape = (
      self.model.dequantizer.noise_shape
      if config.dequantization == 'variational'
      else config.image_shape
    )
    signature = (
      tf.TensorSpec(u_shape, tf.float32),
      [tf.TensorSpec(s, tf.float32) for s in config.noise_shapes()],
    )
    return tf.map_fn(self._draw_row_noise, seeds, fn_output_signature=signature)

  def _elbo(self, images: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
    """Single-sample bound `[M]`, row r with the noise of `seeds[r]` (inference mode)."""
    u, noise = self._row_noise(seeds)
    return self.model.log_likelihood_terms(images, dequant_noise=u, noise=noise)['total']

  # ---------------------------------------------------------------------------------------------
  # Signatures.

  def _log_prob(self, images):
    (images,) = _check_inputs({'images': (images, self._image_dims)})
    log_prob = self._elbo(images, content_seeds(images))
    return {
      'log_prob': log_prob,
      'bits_per_dim': -log_prob * self.model.config.bits_per_dim_scale,
    }

  def _log_prob_bound(self, images, seed, num_samples):
    images, seed, num_samples = _check_inputs(
      {
        'images': (images, self._image_dims),
        'seed': (seed, (None, 2)),
        'num_samples': (num_samples, (None,)),
      }
    )
    num_samples = _checked(
      num_samples,
      tf.reduce_all((num_samples >= 1) & (num_samples <= self._max_num_samples)),
      f'`num_samples` must be in [1, {self._max_num_samples}], got',
    )
    batch = tf.shape(images)[0]
    most = tf.reduce_max(tf.concat([num_samples, [1]], 0))
    # Draw s of row r depends on (seed[r], s) only, so the chunking (which depends on the batch
    # size) changes the grouping of the work, never a row's draws.
    chunk = tf.clip_by_value(self._max_rows_per_step // tf.maximum(batch, 1), 1, most)
    num_chunks = (most + chunk - 1) // chunk
    tiled = tf.tile(images, [chunk, 1, 1, 1])  # row c*N + r is image r, draw c of the chunk
    tiled_seed = tf.tile(seed, [chunk, 1])

    def body(j, lls):
      draw = tf.repeat(j * chunk + tf.range(chunk), batch)
      seeds = tf.map_fn(
        lambda a: tf.cast(tf.random.experimental.stateless_fold_in(a[0], a[1]), tf.int64),
        (tiled_seed, draw),
        fn_output_signature=tf.TensorSpec([2], tf.int64),
      )
      return j + 1, lls.write(j, tf.reshape(self._elbo(tiled, seeds), [chunk, batch]))

    lls = tf.TensorArray(tf.float32, size=num_chunks, element_shape=tf.TensorShape([None, None]))
    _, lls = tf.while_loop(lambda j, _: j < num_chunks, body, (tf.constant(0), lls))
    lls = lls.concat()  # [num_chunks * chunk, N]
    valid = tf.range(tf.shape(lls)[0])[:, None] < num_samples[None, :]
    bound = tf.reduce_logsumexp(tf.where(valid, lls, -math.inf), axis=0) - tf.math.log(
      tf.cast(num_samples, tf.float32)
    )
    return {
      'log_prob_bound': bound,
      'bits_per_dim': -bound * self.model.config.bits_per_dim_scale,
    }

  def _sample(self, seed, temperature):
    seed, temperature = _check_inputs(
      {'seed': (seed, (None, 2)), 'temperature': (temperature, (None,))}
    )
    temperature = _checked(
      temperature,
      tf.reduce_all(tf.math.is_finite(temperature) & (temperature >= 0.0)),
      '`temperature` must be finite and >= 0, got',
    )
    shapes = self.model.config.latent_shapes()

    def row_latents(args):
      row_seed, row_temperature = args
      seeds = tf.random.experimental.stateless_split(row_seed, len(shapes))
      return [
        row_temperature * tf.random.stateless_normal(s, seed=seeds[k]) for k, s in enumerate(shapes)
      ]

    latents = tf.map_fn(
      row_latents,
      (seed, temperature),
      fn_output_signature=[tf.TensorSpec(s, tf.float32) for s in shapes],
    )
    return {'images': self.model.decode(latents)}


# -------------------------------------------------------------------------------------------------
# Writing version directories.


def next_version(export_dir: str) -> int:
  """One more than the largest integer version directory in `export_dir` (1 if there is none)."""
  if not tf.io.gfile.isdir(export_dir):
    return 1
  versions = [
    int(n.rstrip('/')) for n in tf.io.gfile.listdir(export_dir) if _VERSION_RE.match(n.rstrip('/'))
  ]
  return max(versions, default=0) + 1


def _check_new_version(export_dir: str, version: int) -> int:
  version = checks.check_int('version', version, 0, _INT64_MAX)
  path = os.path.join(export_dir, str(version))
  if tf.io.gfile.exists(path):
    raise FileExistsError(f'{path!r} exists; versions are never overwritten.')
  return version


def export_saved_model(
  model: DenseFlow,
  export_dir: str,
  version: Optional[int] = None,
  step: Optional[int] = None,
  max_num_samples: int = 4096,
  max_rows_per_step: int = 64,
) -> str:
  """Writes `model` as a TF Serving SavedModel `export_dir/<version>/`; returns that directory.

  The SavedModel is written to a hidden temporary directory in `export_dir` (TF Serving only
  looks at all-digit names) and renamed into place, so a server polling `export_dir` never sees
  a partial version (on a local or POSIX file system; object stores such as GCS copy on rename).

  Args:
    model: an initialised `DenseFlow` (ActNorm initialised from data or restored).
    export_dir: the model base path TF Serving watches.
    version: the version number; default `next_version(export_dir)`, so the newest export is
      the one TF Serving's default policy (latest version) serves.
    step: the training step of the weights, recorded in `assets.extra/denseflow.json`.
    max_num_samples: see `DenseFlowServingModule`.
    max_rows_per_step: see `DenseFlowServingModule`.

  Returns:
    The path of the new version directory.

  Raises:
    ValueError: `model` is not initialised, holds a non-finite weight (nothing is written), or
      `version` is negative.
    FileExistsError: `export_dir/<version>` already exists (versions are never overwritten).
  """
  if not model.is_initialized:
    raise ValueError(
      'The model is not initialised: call `model.initialize(images)` or restore a checkpoint '
      'before exporting.'
    )
  # The exported variables are the model's own float32 variables (no cast on the way out).
  bad = workdir_lib.nonfinite_variables(_export_variables(model))
  if bad:
    raise ValueError(f'Not exporting non-finite weights: {", ".join(bad[:3])}.')
  if version is not None:
    version = _check_new_version(export_dir, version)
  module = DenseFlowServingModule(model, max_num_samples, max_rows_per_step)
  tf.io.gfile.makedirs(export_dir)
  tmp = os.path.join(export_dir, f'.tmp-{uuid.uuid4().hex}')
  try:
    tf.saved_model.save(
      module,
      tmp,
      signatures=module.signatures,
      options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
    )
    metadata = {
      'config': dataclasses.asdict(model.config),
      'step': step,
      'signatures': sorted(module.signatures),
      'max_num_samples': max_num_samples,
      'tensorflow_version': tf.__version__,
    }
    tf.io.gfile.makedirs(os.path.join(tmp, os.path.dirname(METADATA_FILE)))
    with tf.io.gfile.GFile(os.path.join(tmp, METADATA_FILE), 'w') as f:
      json.dump(metadata, f, indent=2, sort_keys=True)
    # A concurrent export may claim the number first: the rename then fails and, with the
    # default version, the next free number is tried.
    for _ in range(10 if version is None else 1):
      target = os.path.join(
        export_dir, str(next_version(export_dir) if version is None else version)
      )
      try:
        tf.io.gfile.rename(tmp, target, overwrite=False)
        return target
      except (tf.errors.AlreadyExistsError, tf.errors.FailedPreconditionError) as err:
        error = err
    raise FileExistsError(f'{target!r} exists; versions are never overwritten.') from error
  finally:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.rmtree(tmp)


# -------------------------------------------------------------------------------------------------
# Command line.


def define_export_flags() -> None:
  """Defines this program's flags; called by `run` only (importing the module defines none).

  Shared flags (`--workdir`, `--checkpoint`) keep an existing definition, as in `flags.py`.
  """
  define = flags_lib.define  # leaves a flag another program defined (tests) as it is
  define(
    flags.DEFINE_string,
    'workdir',
    None,
    'Training run directory (model_config.json, checkpoints/).',
  )
  define(
    flags.DEFINE_string,
    'export_dir',
    None,
    'Model base path: versions are written as EXPORT_DIR/N.',
  )
  define(
    flags.DEFINE_integer,
    'version',
    None,
    'Version number; default: one more than the largest existing version (1 if none).',
    lower_bound=0,
    upper_bound=_INT64_MAX,
  )
  define(
    flags.DEFINE_string,
    'checkpoint',
    None,
    'Checkpoint prefix (default: the latest in WORKDIR/checkpoints).',
  )
  define(
    flags.DEFINE_integer,
    'max_num_samples',
    4096,
    'Most draws one row of log_prob_bound may request.',
    lower_bound=1,
    upper_bound=flags_lib.INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'max_rows_per_step',
    64,
    'log_prob_bound evaluates about this many (image, draw) pairs per loop step.',
    lower_bound=1,
    upper_bound=flags_lib.INT32_MAX,
  )


def main(argv: Sequence[str]) -> None:
  """Exports the workdir's checkpoint; bad input ends it with one `error: ...` line, exit 2."""
  if len(argv) > 1:
    flags_lib.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  for name in ('workdir', 'export_dir'):
    if not FLAGS[name].value:
      flags_lib.fail(f'--{name} is required.')
  try:
    if FLAGS.version is not None:
      _check_new_version(FLAGS.export_dir, FLAGS.version)  # before the (slow) restore
    model, step = workdir_lib.restore_model(FLAGS.workdir, FLAGS.checkpoint)
    path = export_saved_model(
      model,
      FLAGS.export_dir,
      version=FLAGS.version,
      step=step,
      max_num_samples=FLAGS.max_num_samples,
      max_rows_per_step=FLAGS.max_rows_per_step,
    )
  except (ValueError, TypeError, OSError) as e:  # CheckpointError is a ValueError
    flags_lib.fail(str(e))
  except (tf.errors.PermissionDeniedError, tf.errors.FailedPreconditionError) as e:
    flags_lib.fail(f'--export_dir={FLAGS.export_dir}: cannot write there ({e.message}).')
  logging.info('Exported step %d of %s to %s', step, FLAGS.workdir, path)
  print(path)


def run() -> None:
  """Defines the flags and runs `main` (the `python -m tf_denseflow.export` entry point)."""
  define_export_flags()
  app.run(main, flags_parser=flags_lib.parse_flags)


if __name__ == '__main__':
  run()
