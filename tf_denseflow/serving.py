"""The serving module: a DenseFlow behind plain-TF signatures, each row seeded on its own.

```
serving_default  images uint8 [N,H,W,C]                                  -> elbo, bits_per_dim [N]
log_prob_bound   images, seed int64 [N,2], num_importance_samples int32 [N]
                                                                  -> log_prob_bound, bits_per_dim
sample           seed int64 [N,2], temperature float32 [N]               -> images uint8 [N,H,W,C]
```
Each row is a function of that row's inputs alone, never of the other rows of its batch: the
noise of row `r` is the model's own (`DenseFlow.draw_noise`, `DenseFlow.sample_latents`) for a
batch of one, from that row's seed:
```
serving_default[r] == model.elbo(images[r:r+1], seed=content_seeds(images)[r])
log_prob_bound[r]  == log mean_{s < num_importance_samples[r]} exp(
                          model.elbo(images[r:r+1], seed=fold_in(seed[r], s)))
sample[r]          == model.sample(1, seed=seed[r], temperature=temperature[r])
```
(`fold_in` is `tf.random.experimental.stateless_fold_in`.) The graph holds only core TF ops:
stateless random ops, no `jit_compile`, no TFP or Keras at load time. `tf_denseflow.export`
writes it as versioned SavedModels (docs/serving.md).

Grcic, Grubisic, Segvic. Densely connected normalizing flows. NeurIPS 2021.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from tf_denseflow.bounds import iwbo_accumulate, iwbo_normalize
from tf_denseflow.model import DenseFlow

__all__ = ['DenseFlowServingModule', 'content_seeds', 'serving_variables']

_SERVING_SEED_SALT = 0x5EED  # second word of every serving_default seed


def content_seeds(images: tf.Tensor) -> tf.Tensor:
  """Per-row stateless seeds `[N, 2]` int64 from the images' bytes (serving_default's noise).

  ```
  seed[r] = [farmhash64(bytes of images[r]) as int64, 0x5EED]
  ```
  Equal images get equal seeds (so an equal `elbo`), distinct images independent noise.
  `tf.fingerprint` is documented as stable across platforms; the 8 bytes are assembled
  little-endian with integer ops, so the seed does not depend on the host byte order either.

  Args:
    images: `[N, ...]` tensor (uint8 `[N, H, W, C]` in serving).

  Returns:
    int64 `[N, 2]`.
  """
  fingerprint = tf.cast(tf.fingerprint(images), tf.int64)  # [N, 8] bytes
  shifts = tf.constant([8 * k for k in range(8)], tf.int64)
  hashes = tf.reduce_sum(tf.bitwise.left_shift(fingerprint, shifts), axis=1)  # [N]
  return tf.stack([hashes, tf.fill(tf.shape(hashes), tf.constant(_SERVING_SEED_SALT, tf.int64))], 1)


def serving_variables(model: DenseFlow) -> List[tf.Variable]:
  """Every variable of `model` as a plain `tf.Variable`: Keras 3 variables unwrapped.

  A Keras 3 variable exports as a *copy* of its `tf.Variable` (`_export_to_saved_model_graph`
  in keras/src/backend/tensorflow/core.py). TF1-style loaders (TF Serving, `saved_model_cli
  run`) restore that copy, not the variable the signatures read, and fail with "Could not find
  variable ...". Tracking the underlying `tf.Variable`s directly (and not the model object) gives
  one restored variable per weight, the one the functions capture.

  Raises:
    TypeError: a variable that is neither a `tf.Variable` nor a Keras variable.
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


# -------------------------------------------------------------------------------------------------
# Input checks, on the tensors actually fed.


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
    by name (`InvalidArgumentError`) before any model op can fail on it.
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


# -------------------------------------------------------------------------------------------------
# The module.


class DenseFlowServingModule(tf.Module):
  """The export module: a DenseFlow behind three plain-TF signatures with per-row randomness.

  Methods (each a `tf.function` with an explicit input signature; the SavedModel's signatures
  `serving_default`, `log_prob_bound` and `sample` are these functions):
  - `elbo(images)` -> `{'elbo', 'bits_per_dim'}`: the single-sample ELBO (nats, a lower bound of
    log P(images)) with the noise seeded by `content_seeds(images)`: deterministic.
  - `log_prob_bound(images, seed, num_importance_samples)` -> `{'log_prob_bound',
    'bits_per_dim'}`: the importance-weighted bound with `num_importance_samples[r]` draws for
    row r, draw s seeded by `stateless_fold_in(seed[r], s)`. Rows may ask for different numbers.
  - `sample(seed, temperature)` -> `{'images'}`: one uint8 sample per row.

  The batch norms run in inference mode (the model's default). Value checks (`temperature` finite
  and >= 0, `1 <= num_importance_samples <= max_num_samples`, equal batch sizes, and every input's
  shape, checked on the tensor actually fed) raise `InvalidArgumentError` naming the input.

  Args:
    model: an initialised `DenseFlow`.
    max_num_samples: the most importance samples one row of `log_prob_bound` may request.
    max_rows_per_step: `log_prob_bound` evaluates about this many (image, draw) pairs per loop
      step (at least one draw of the whole batch), to bound memory.

  Raises:
    TypeError: `model` is not a `DenseFlow`.
    ValueError: `max_num_samples` or `max_rows_per_step` below 1.
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
    self.model_variables = serving_variables(model)
    self._max_num_samples = int(max_num_samples)
    self._max_rows_per_step = int(max_rows_per_step)
    self._image_dims = (None,) + tuple(model.config.image_shape)
    images = tf.TensorSpec(self._image_dims, tf.uint8, name='images')
    seed = tf.TensorSpec([None, 2], tf.int64, name='seed')
    num_samples = tf.TensorSpec([None], tf.int32, name='num_importance_samples')
    temperature = tf.TensorSpec([None], tf.float32, name='temperature')
    self.elbo = tf.function(self._elbo_signature, input_signature=[images], autograph=False)
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
      'serving_default': self.elbo,
      'log_prob_bound': self.log_prob_bound,
      'sample': self.sample,
    }

  def _row_noise(self, seeds: tf.Tensor):
    """Each row's noise from its seed: `DenseFlow.draw_noise(seeds[r], 1)`, rows stacked.

    Returns:
      `(dequant_noise [M, ...], [noise_k [M, ...]])` for `seeds [M, 2]` int64.
    """
    model = self.model

    def one_row(seed):
      u, noise = model.draw_noise(seed, 1)
      return u[0], [n[0] for n in noise]

    signature = (
      tf.TensorSpec(model.dequantizer.noise_shape, tf.float32),
      [tf.TensorSpec(s, tf.float32) for s in model.config.noise_shapes()],
    )
    return tf.map_fn(one_row, seeds, fn_output_signature=signature)

  def _row_elbo(self, images: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
    """Single-sample bound `[M]`, row r with the noise of `seeds[r]` (inference mode)."""
    u, noise = self._row_noise(seeds)
    return self.model.elbo_terms(images, dequant_noise=u, noise=noise)['total']

  def _outputs(self, name: str, bound: tf.Tensor) -> Dict[str, tf.Tensor]:
    return {name: bound, 'bits_per_dim': -bound * self.model.config.bits_per_dim_scale}

  # ---------------------------------------------------------------------------------------------
  # Signatures.

  def _elbo_signature(self, images):
    (images,) = _check_inputs({'images': (images, self._image_dims)})
    return self._outputs('elbo', self._row_elbo(images, content_seeds(images)))

  def _log_prob_bound(self, images, seed, num_importance_samples):
    images, seed, num_samples = _check_inputs(
      {
        'images': (images, self._image_dims),
        'seed': (seed, (None, 2)),
        'num_importance_samples': (num_importance_samples, (None,)),
      }
    )
    num_samples = _checked(
      num_samples,
      tf.reduce_all((num_samples >= 1) & (num_samples <= self._max_num_samples)),
      f'`num_importance_samples` must be in [1, {self._max_num_samples}], got',
    )
    batch = tf.shape(images)[0]
    most = tf.reduce_max(tf.concat([num_samples, [1]], 0))
    # Draw s of row r depends on (seed[r], s) only, so the chunking (which depends on the batch
    # size) changes the grouping of the work, never a row's draws.
    chunk = tf.clip_by_value(self._max_rows_per_step // tf.maximum(batch, 1), 1, most)
    num_chunks = (most + chunk - 1) // chunk
    tiled = tf.tile(images, [chunk, 1, 1, 1])  # row c*N + r is image r, draw c of the chunk
    tiled_seed = tf.tile(seed, [chunk, 1])

    def body(j, acc):
      draws = j * chunk + tf.range(chunk)
      seeds = tf.map_fn(
        lambda a: tf.cast(tf.random.experimental.stateless_fold_in(a[0], a[1]), tf.int64),
        (tiled_seed, tf.repeat(draws, batch)),
        fn_output_signature=tf.TensorSpec([2], tf.int64),
      )
      lls = tf.reshape(self._row_elbo(tiled, seeds), [chunk, batch])
      # Rows asking for fewer draws than `most` have their surplus draws masked out.
      return j + 1, iwbo_accumulate(acc, lls, draws, num_samples)

    acc0 = tf.fill([batch], -math.inf)
    _, acc = tf.while_loop(lambda j, _: j < num_chunks, body, (tf.constant(0), acc0))
    return self._outputs('log_prob_bound', iwbo_normalize(acc, num_samples))

  def _sample(self, seed, temperature):
    seed, temperature = _check_inputs(
      {'seed': (seed, (None, 2)), 'temperature': (temperature, (None,))}
    )
    temperature = _checked(
      temperature,
      tf.reduce_all(tf.math.is_finite(temperature) & (temperature >= 0.0)),
      '`temperature` must be finite and >= 0, got',
    )

    def row_latents(args):
      row_seed, row_temperature = args
      return [z[0] for z in self.model.sample_latents(1, row_seed, row_temperature)]

    latents = tf.map_fn(
      row_latents,
      (seed, temperature),
      fn_output_signature=[tf.TensorSpec(s, tf.float32) for s in self.model.config.latent_shapes()],
    )
    return {'images': self.model.decode(latents)}
