"""Networks of the same structure share one traced, non-inlined function of their weights.

DenseFlow-74-10 has 74 coupling networks in about 11 shapes. Inlined into a traced step, each one
adds its ~1-2k ops, and as many again for its gradient, to the graph that TensorFlow traces,
optimises and instantiates (177k ops for the 74-10 training step; docs/benchmarks.md, section 4).
A `SharedNetwork` called in a graph instead becomes one call op of a `tf.function` that takes the
input and the network's weights as arguments:
```
y, bn_stats = shared_fn[structure](x, [w_1, .., w_n], training)   # one call op in the caller
for each BatchNorm b of the network:  b.update_statistics(*bn_stats[b])
```
One function body is traced per network structure (class and constructor arguments), input
signature and call signature (`training`, XLA-compatible tracing, convolution kernels), however
many networks share it; the body is the first such network's `body`, traced with every weight
read replaced by the argument (`keras.StatelessScope`). The function carries TF's `_noinline`
attribute, which keeps grappler's function optimizer and the runtime's call lowering from
inlining it, and which TF copies to the forward and backward functions it derives for the
gradient, so those exist once per structure too.

Batch norm in training mode records its batch statistics (`nn.layers.collect_batch_norm_updates`)
inside the body; the body returns them and the caller hands them to its own `BatchNorm` layers'
`update_statistics`, so they are recorded (or assigned) exactly as an inlined call would.
Eager calls and XLA-compatible traces (`--jit_compile`: XLA compiles the whole replica function,
and a non-inlined call inside its cluster was recompiled on every step) run `body` directly.
`ENABLED = False` (or `sharing(False)`) turns it off for functions traced from then on.

A trace is reused for every later call with the same key, so everything that changes what
`body` traces must be in the key: the constructor arguments (`structure`), the input's shape and
dtype, `training`, and the process-wide trace-time switches (`xla.compatible_now()`,
`kernels.resolve()`, `nn.recompute.gradient_expected()`; add any new one to `_TraceKey`). The
input's static shape is in `_TraceKey` too: `tf.function` would serve a call with a known batch
from an earlier trace for an unknown one (a subtype match), whose graph reads its shapes at run
time (`tf_denseflow.shapes`: ~20% more ops in a coupling network), so which trace a training
step got would depend on what the process traced before (an export, a TFP pipeline). A
variable read that is not one of the layer's `weights` would be captured from the first network
into every one; a trace that captures a variable raises `RuntimeError`.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Dict, Iterator, Tuple

import keras
import tensorflow as tf

from tf_denseflow import kernels, xla
from tf_denseflow.nn import recompute
from tf_denseflow.nn.layers import BatchNorm, BatchNormUpdates, Layer, collect_batch_norm_updates

__all__ = ['ENABLED', 'FUNCTION_PREFIX', 'SharedNetwork', 'sharing']

# Whether networks traced from now on share their function (module docstring).
ENABLED = True
# Traced function names start with this (tests count the bodies in a graph's library).
FUNCTION_PREFIX = 'shared_network'

_FUNCTIONS: Dict[tuple, tf.types.experimental.PolymorphicFunction] = {}
# The process-wide trace-time switches a trace depends on (module docstring).
_TraceKey = collections.namedtuple(
  '_TraceKey', ['xla', 'kernels', 'gradient_expected', 'static_shape']
)
_LOCK = threading.Lock()
_STATE = threading.local()


@contextlib.contextmanager
def sharing(enabled: bool) -> Iterator[None]:
  """Within the block, functions traced share (or do not share) network functions."""
  global ENABLED
  previous, ENABLED = ENABLED, bool(enabled)
  try:
    yield
  finally:
    ENABLED = previous


class _RawStatistics(BatchNormUpdates):
  """Keeps each batch norm's `(mean, unbiased_variance)` of the batch as given."""

  def __init__(self, layers):
    super().__init__()
    self._index = {id(layer): i for i, layer in enumerate(layers)}
    self.values: Dict[int, Tuple[tf.Tensor, tf.Tensor]] = {}

  def record(self, layer, mean, unbiased_variance):
    # As int32 bits: an integer output gets no gradient, so the caller's gradient passes no
    # zeros (constants) for it, which would make grappler specialise the backward function for
    # every call site (a copy per network).
    self.values[self._index[id(layer)]] = tuple(
      tf.bitcast(v, tf.int32) for v in (mean, unbiased_variance)
    )


def _batch_norms(layer: Layer) -> list:
  return [sub for sub in layer._flatten_layers(include_self=False) if isinstance(sub, BatchNorm)]


def _weights(layer: Layer, training: bool) -> list:
  # Training mode reads no batch-norm running statistics; passing them would give the backward
  # function gradient outputs that no caller uses (again a specialised copy per call site).
  return layer.trainable_weights if training else layer.weights


def _traced_body(x, weights, training, trace_key):
  """The shared function's Python body: the calling network's `body` as a function of weights."""
  gradient_expected = trace_key.gradient_expected  # the caller's (a graph of its own)
  layer = _STATE.template
  statistics = _RawStatistics(_batch_norms(layer))
  _STATE.inside = True
  try:
    with keras.StatelessScope(list(zip(_weights(layer, training), weights))):
      with collect_batch_norm_updates(statistics), recompute.expecting_gradient(gradient_expected):
        y = layer.body(x, training=training)
  finally:
    _STATE.inside = False
  return y, statistics.values


def _function(structure: tuple):
  with _LOCK:
    fn = _FUNCTIONS.get(structure)
    if fn is None:

      def traced(x, weights, training, trace_key):
        return _traced_body(x, weights, training, trace_key)

      # The traced functions are named after it (tests count them in a graph's library).
      traced.__name__ = f'{FUNCTION_PREFIX}_{structure[0]}_{len(_FUNCTIONS)}'
      fn = tf.function(traced, autograph=False, experimental_attributes={'_noinline': True})
      _FUNCTIONS[structure] = fn
    return fn


def _check_no_captured_variables(fn, args) -> None:
  captured = fn.get_concrete_function(*args).captured_inputs
  resources = [t for t in captured if t.dtype == tf.resource]
  if resources:
    raise RuntimeError(
      f'A shared network function captured {len(resources)} variable(s): some weight is not '
      'read through `layer.weights`, so every network of this structure would use the first '
      "one's value."
    )


class SharedNetwork(Layer):
  """A Keras layer whose calls in a traced graph go through one function per structure.

  Subclasses implement `body(x, training)` (the network) and set `self.structure` (a tuple of
  the constructor arguments that fix the weights' shapes and the computation) in `__init__`;
  `uses_training = False` for networks without batch norm (one trace for both modes).
  """

  uses_training = True

  def body(self, x, training=False):
    raise NotImplementedError

  def call(self, x, training=False):
    training = bool(training) if self.uses_training else False
    if (
      not ENABLED
      or tf.executing_eagerly()
      or getattr(_STATE, 'inside', False)
      # Under --jit_compile XLA compiles the whole replica function anyway, and a non-inlined
      # call inside an XLA cluster was recompiled on every step (tiny, 16x16, batch 4: 27.8 s
      # a step instead of 0.02 s): XLA-compatible traces inline the networks.
      or xla.compatible_now()
    ):
      return self.body(x, training=training)
    fn = _function((type(self).__name__,) + tuple(self.structure))
    weights = [tf.convert_to_tensor(w) for w in _weights(self, training)]
    static_shape = None if x.shape.rank is None else tuple(x.shape.as_list())
    trace_key = _TraceKey(
      xla.compatible_now(), kernels.resolve(), recompute.gradient_expected(), static_shape
    )
    args = (x, weights, training, trace_key)
    traces = fn.experimental_get_tracing_count()
    _STATE.template = self  # the body to trace, if this call traces
    try:
      y, statistics = fn(*args)
    finally:
      _STATE.template = None
    if fn.experimental_get_tracing_count() != traces:
      _check_no_captured_variables(fn, args)
    layers = _batch_norms(self)
    for i, (mean, unbiased_variance) in sorted(statistics.items()):
      layers[i].update_statistics(
        tf.bitcast(mean, tf.float32), tf.bitcast(unbiased_variance, tf.float32)
      )
    return y
