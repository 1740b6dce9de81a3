"""Shared assertions for the bijector and model tests (STYLE.md section 2.4).

Every helper takes the running `tf.test.TestCase` as `test`, so failures are reported by the test
that called it. Structured (multipart) values are lists of tensors; `event_ndims` arguments are the
bijector's `*_min_event_ndims` structure (every DenseFlow bijector works on `[H, W, C]` events).
Tolerances are arguments with the defaults written here, so each test states what it expects.
"""

from __future__ import annotations

from typing import Any, Callable, List, Sequence

import keras
import numpy as np
import tensorflow as tf

__all__ = [
  'CountingNetwork',
  'all_trainable_variables',
  'assert_all_variables_get_gradients',
  'assert_log_det_consistent',
  'assert_log_det_matches_jacobian',
  'assert_round_trip',
  'assert_traces_with_unknown_batch',
  'cast_structure',
  'flatten_parts',
  'jacobian',
  'jacobian_log_det',
  'keras_layers',
  'perturb_variables',
  'random_structure',
]


# -------------------------------------------------------------------------------------------------
# Variables.


def keras_layers(module: tf.Module) -> List[keras.layers.Layer]:
  """Every Keras layer held (directly or nested in lists/dicts) by `module`'s tf.Module tree."""
  return list(module._flatten(predicate=lambda m: isinstance(m, keras.layers.Layer)))


def all_trainable_variables(module: tf.Module) -> list:
  """tf.Variables seen by `tf.Module` plus every Keras 3 layer's trainable variables (dedup by id).

  `tf.Module.trainable_variables` does not see Keras 3 variables (tensorflow/tensorflow#84019), so
  this is the view a training loop must use (the same rule as `DenseFlow.trainable_variables`).
  """
  found, seen = [], set()
  candidates = list(tf.Module.trainable_variables.fget(module))
  for layer in keras_layers(module):
    candidates += list(layer.trainable_variables)
  for v in candidates:
    if id(v) not in seen:
      seen.add(id(v))
      found.append(v)
  return found


def perturb_variables(variables: Sequence[Any], seed: int = 0, scale: float = 0.1) -> None:
  """Adds `N(0, scale**2)` noise to every variable (so zero-initialised convs become non-zero).

  Deterministic in `seed` and in the order of `variables`.
  """
  for k, v in enumerate(variables):
    noise = tf.random.stateless_normal(v.shape, seed=[seed, k], stddev=scale, dtype=v.dtype)
    v.assign(v + noise)


# -------------------------------------------------------------------------------------------------
# Structures of tensors.


def random_structure(shapes, batch_shape=(), seed: int = 0, dtype=tf.float32, scale: float = 1.0):
  """A tensor (or list) of `N(0, scale**2)` draws of shape `batch_shape + event` per part."""
  if isinstance(shapes[0], (list, tuple)):  # multipart: a list of event shapes
    return [
      random_structure(s, batch_shape, seed * 1000 + k, dtype, scale) for k, s in enumerate(shapes)
    ]
  shape = list(batch_shape) + list(shapes)
  return scale * tf.random.stateless_normal(shape, seed=[seed, 17], dtype=dtype)


def cast_structure(value, dtype):
  return tf.nest.map_structure(lambda t: tf.cast(t, dtype), value)


def flatten_parts(value):
  """Flattens an unbatched tensor or list into one vector; returns `(vector, unflatten)`."""
  parts = value if isinstance(value, list) else [value]
  shapes = [p.shape for p in parts]
  sizes = [s.num_elements() for s in shapes]
  vector = tf.concat([tf.reshape(p, [-1]) for p in parts], 0)

  def unflatten(v):
    pieces = [tf.reshape(p, s) for p, s in zip(tf.split(v, sizes), shapes)]
    return pieces if isinstance(value, list) else pieces[0]

  return vector, unflatten


def _flat(value) -> tf.Tensor:
  return tf.concat([tf.reshape(p, [-1]) for p in tf.nest.flatten(value)], 0)


def _assert_close(test, got, want, atol, rtol=0.0, msg=''):
  got, want = tf.nest.flatten(got), tf.nest.flatten(want)
  test.assertLen(got, len(want), msg=msg)
  for g, w in zip(got, want):
    test.assertAllClose(g, w, atol=atol, rtol=rtol, msg=msg)


def _assert_finite(test, value, msg=''):
  for t in tf.nest.flatten(value):
    test.assertTrue(np.all(np.isfinite(np.asarray(t))), msg=f'non-finite values {msg}')


# -------------------------------------------------------------------------------------------------
# Bijector assertions.


def assert_round_trip(test, bijector, z, x, atol: float = 1e-5, **kwargs) -> None:
  """z -> x -> z and x -> z -> x through the `*_and_log_det` pair, all finite.

  Also checks that the log-dets of the two directions cancel on the way round. `z` and `x` are
  independent inputs (a latent draw and a data-side draw). TFP's public methods are checked
  against the pair in `assert_log_det_consistent`.
  """
  x_of_z, fldj = bijector.forward_and_log_det(z, **kwargs)
  z_back, ildj = bijector.inverse_and_log_det(x_of_z, **kwargs)
  _assert_finite(test, [x_of_z, fldj, z_back, ildj], 'in the z -> x -> z round trip')
  _assert_close(test, z_back, z, atol, msg='z -> x -> z')
  test.assertAllClose(fldj, -ildj, atol=atol * 10, rtol=1e-5, msg='fldj(z) != -ildj(x)')

  z_of_x, ildj = bijector.inverse_and_log_det(x, **kwargs)
  x_back, fldj = bijector.forward_and_log_det(z_of_x, **kwargs)
  _assert_finite(test, [z_of_x, ildj, x_back, fldj], 'in the x -> z -> x round trip')
  _assert_close(test, x_back, x, atol, msg='x -> z -> x')


def assert_log_det_consistent(test, bijector, z, batch_shape, atol: float = 1e-5, **kwargs):
  """`fldj(z) == -ildj(forward(z))`, the log-det shape is the batch shape, and TFP == the pair.

  TFP's public methods are called on fresh tensors (no cache or memo hit) and on the same tensors
  (a cache/memo hit), and both must agree with `forward_and_log_det`/`inverse_and_log_det`.
  """
  fwd_ndims = bijector.forward_min_event_ndims
  inv_ndims = bijector.inverse_min_event_ndims
  x, fldj_pair = bijector.forward_and_log_det(z, **kwargs)
  z_pair, ildj_pair = bijector.inverse_and_log_det(x, **kwargs)
  _assert_close(test, z_pair, z, atol * 10)
  test.assertAllEqual(fldj_pair.shape, batch_shape)
  test.assertAllEqual(ildj_pair.shape, batch_shape)
  test.assertAllClose(fldj_pair, -ildj_pair, atol=atol, rtol=1e-5)

  fresh_z = tf.nest.map_structure(tf.identity, z)
  fresh_x = tf.nest.map_structure(tf.identity, x)
  fldj = bijector.forward_log_det_jacobian(fresh_z, event_ndims=fwd_ndims, **kwargs)
  ildj = bijector.inverse_log_det_jacobian(fresh_x, event_ndims=inv_ndims, **kwargs)
  test.assertAllEqual(fldj.shape, batch_shape)
  test.assertAllEqual(ildj.shape, batch_shape)
  test.assertAllClose(fldj, fldj_pair, atol=atol, rtol=1e-5)
  test.assertAllClose(ildj, ildj_pair, atol=atol, rtol=1e-5)
  test.assertAllClose(fldj, -ildj, atol=atol, rtol=1e-5)

  # After forward/inverse on the same tensor objects (the memo path of TransformedDistribution).
  x_public = bijector.forward(fresh_z, **kwargs)
  _assert_close(test, x_public, x, atol)
  fldj_memo = bijector.forward_log_det_jacobian(fresh_z, event_ndims=fwd_ndims, **kwargs)
  test.assertAllClose(fldj_memo, fldj_pair, atol=atol, rtol=1e-5)
  z_public = bijector.inverse(fresh_x, **kwargs)
  _assert_close(test, z_public, z_pair, atol)
  ildj_memo = bijector.inverse_log_det_jacobian(fresh_x, event_ndims=inv_ndims, **kwargs)
  test.assertAllClose(ildj_memo, ildj_pair, atol=atol, rtol=1e-5)


def jacobian(fn: Callable, value, use_batch_rows: bool = True) -> tf.Tensor:
  """The `[n_out, n_in]` Jacobian of `fn` at an unbatched `value` (tensor or list), flattened.

  `fn` maps the structure to `(output structure, log_det)`; input and output parts are flattened
  and concatenated in order. With `use_batch_rows` (default), `value` is replicated `n_out` times
  along a new batch axis and row i is the gradient of output i of copy i: one forward and one
  backward pass, valid because every bijector here treats batch members independently (batch norm
  in inference mode). Otherwise `tf.GradientTape.jacobian` of the unbatched map, one gradient per
  output in a while loop (`experimental_use_pfor=False`): these tests check the bijectors, not
  pfor, and pfor's broadcasting batch matmuls crash TF 2.21 with oneDNN on Intel AMX CPUs
  (BUILD.md, "Known TF bugs"; `batch_matmul_test.py` covers pfor on the product's graphs).
  """
  vector, unflatten = flatten_parts(value)
  if not use_batch_rows:
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(vector)
      out = _flat(fn(unflatten(vector))[0])
    return tape.jacobian(out, vector, experimental_use_pfor=False)
  n_out = int(_flat(fn(value)[0]).shape[0])
  events = [p.shape for p in tf.nest.flatten(value)]
  sizes = [e.num_elements() for e in events]
  rows = tf.tile(vector[None], [n_out, 1])  # [n_out, n_in]
  with tf.GradientTape() as tape:
    tape.watch(rows)
    batched = [
      tf.reshape(t, [n_out] + e.as_list()) for t, e in zip(tf.split(rows, sizes, axis=1), events)
    ]
    out = fn(batched if isinstance(value, list) else batched[0])[0]
    out = tf.concat([tf.reshape(t, [n_out, -1]) for t in tf.nest.flatten(out)], axis=1)
    diagonal = tf.reduce_sum(tf.linalg.diag_part(out))  # output i of copy i
  return tape.gradient(diagonal, rows)


def jacobian_log_det(fn: Callable, value, use_batch_rows: bool = True) -> float:
  """`log|det J|` of `fn` at an unbatched `value` (see `jacobian`), computed in float64."""
  sign, log_abs_det = tf.linalg.slogdet(tf.cast(jacobian(fn, value, use_batch_rows), tf.float64))
  if float(sign) == 0.0:
    raise AssertionError('The Jacobian is singular.')
  return float(log_abs_det)


def assert_log_det_matches_jacobian(
  test,
  bijector,
  z,
  x,
  atol: float = 1e-6,
  rtol: float = 1e-6,
  directions: Sequence[str] = ('forward', 'inverse'),
  **kwargs,
) -> None:
  """The log-det of each direction equals `slogdet` of the autodiff Jacobian (unbatched z, x)."""
  for direction, fn, value in (
    ('forward', lambda v: bijector.forward_and_log_det(v, **kwargs), z),
    ('inverse', lambda v: bijector.inverse_and_log_det(v, **kwargs), x),
  ):
    if direction not in directions:
      continue
    want = jacobian_log_det(fn, value)
    got = float(fn(value)[1])
    test.assertAllClose(got, want, atol=atol, rtol=rtol, msg=f'{direction} log-det vs Jacobian')


def _spec(value):
  return tf.nest.map_structure(lambda t: tf.TensorSpec([None] + t.shape[1:], t.dtype), value)


def assert_traces_with_unknown_batch(test, bijector, z, x, atol: float = 1e-5, **kwargs) -> None:
  """TFP's public methods in `tf.function` with `input_signature` batch `None` == the eager pair.

  Each traced function calls `forward`/`inverse` and then the log-det on the same symbolic input
  (the FlowBijector memo makes that one evaluation). `z` and `x` must have one batch dimension.
  """

  @tf.function(input_signature=[_spec(z)])
  def forward(v):
    out = bijector.forward(v, **kwargs)
    ldj = bijector.forward_log_det_jacobian(
      v, event_ndims=bijector.forward_min_event_ndims, **kwargs
    )
    return out, ldj

  @tf.function(input_signature=[_spec(x)])
  def inverse(v):
    out = bijector.inverse(v, **kwargs)
    ldj = bijector.inverse_log_det_jacobian(
      v, event_ndims=bijector.inverse_min_event_ndims, **kwargs
    )
    return out, ldj

  for fn, eager_fn, value in (
    (forward, bijector.forward_and_log_det, z),
    (inverse, bijector.inverse_and_log_det, x),
  ):
    out, ldj = fn(value)
    want_out, want_ldj = eager_fn(value, **kwargs)
    _assert_close(test, out, want_out, atol)
    test.assertAllClose(ldj, want_ldj, atol=atol, rtol=1e-5)
    # The traced graph really has an unknown batch size; a second batch size reuses it.
    concrete = fn.get_concrete_function()
    for spec in tf.nest.flatten(concrete.structured_input_signature[0]):
      test.assertIsNone(spec.shape[0])
    first = tf.nest.map_structure(lambda t: t[:1], value)
    out1, _ = fn(first)
    _assert_close(test, out1, tf.nest.map_structure(lambda t: t[:1], want_out), atol)


def assert_all_variables_get_gradients(
  test, bijector, z, x, variables, require_nonzero: bool = True, **kwargs
) -> None:
  """Every variable gets a non-None (and, by default, non-zero) finite gradient of
  `sum(output) + sum(log_det)`, in each direction separately."""
  test.assertNotEmpty(variables)
  for direction, fn, value in (
    ('forward', bijector.forward_and_log_det, z),
    ('inverse', bijector.inverse_and_log_det, x),
  ):
    with tf.GradientTape() as tape:
      out, ldj = fn(value, **kwargs)
      loss = tf.add_n([tf.reduce_sum(t) for t in tf.nest.flatten(out)]) + tf.reduce_sum(ldj)
    grads = tape.gradient(loss, variables)
    for v, g in zip(variables, grads):
      test.assertIsNotNone(g, msg=f'{direction}: no gradient for {getattr(v, "path", v.name)}')
      g = tf.convert_to_tensor(g)
      test.assertTrue(np.all(np.isfinite(g.numpy())), msg=f'{direction}: non-finite gradient')
      if require_nonzero:
        test.assertGreater(
          float(tf.reduce_max(tf.abs(g))), 0.0, msg=f'{direction}: zero gradient for {v.name}'
        )


# -------------------------------------------------------------------------------------------------
# Conditioner call counting.


class CountingNetwork(keras.layers.Layer):
  """Wraps a Keras conditioner and counts its (Python-level) calls."""

  def __init__(self, network, name=None):
    super().__init__(name=name)
    self.network = network
    self.calls = 0
    self.built = True

  def call(self, x, training=False):
    self.calls += 1
    return self.network(x, training=training)  # Keras drops `training` if `network` has none.
