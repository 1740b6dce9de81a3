"""Where the memory of one benchmark phase goes: peak RSS by stage, and what it can account for.

```
python benchmarks/memory_phases.py --preset=small --batch_size=16 --phase=train --steps=3
python benchmarks/memory_phases.py --preset=small --batch_size=16 --phase=eval
python benchmarks/memory_phases.py --preset=small --batch_size=16 --phase=sample
python benchmarks/memory_phases.py --preset=denseflow_74_10 --batch_size=4 --phase=train --steps=1
```
Runs ONE phase of `python -m tf_denseflow.bench` in this process (run each phase in its own
process: the peak resident set `ru_maxrss` never goes down) and prints (and writes to
`--json`), one line per stage: the process's peak RSS (`ru_maxrss`), current RSS (`VmRSS`) and
TF's CPU allocator (`tf.config.experimental.get_memory_info('CPU:0')`: bytes of live tensors,
`current`, and the most at once since the last stage, `peak`) after each stage:

- `imports`: TensorFlow, Keras, TFP and tf_denseflow imported (the runtime's baseline);
- `model`: `DenseFlow(config)` built (weights created);
- `init`: the ActNorm data initialisation (`model.initialize`, one eager training-mode pass);
- `optimizer` (train only): Adamax slots built and the train step made (`bench.build_phases`);
- `forward_traced`, `forward_1st_call` (train with `--forward_first`): the training-mode loss
  alone (no gradient) traced and called once, for the forward-only/forward+backward difference;
- `traced`: the phase's `tf.function` traced (`get_concrete_function`, no execution);
- `1st_call`: the first call (function instantiation: grappler, executor, kernels; then the run);
- `steps`: `--steps` more calls.

`--phase=train` uses `bench.build_phases` as is (model, ActNorm init, Adamax slots, the training
loop's own `train_step.make_train_step`). `eval` and `sample` build only the model (no optimizer
slots: an evaluation or sampling process has none) with the same seed, data and functions as
`build_phases`; `--via_bench` builds them through `build_phases` too (as the bench, which runs
all three phases in one process, does).

Experiments: `--static_batch` (the model's empty-batch `tf.cond` skipped when the batch size is
static), `--grappler=pass=false,...` (`tf.config.optimizer` options), `--no_shared_functions`
(every network inlined into the traced graph, as before `nn.shared_function`); glibc's allocator
through the usual `MALLOC_*` environment variables. Results: docs/benchmarks.md section 4.

Accounted sizes: parameter, batch-norm and optimizer-slot bytes; the traced graph (nodes in the
function and its library, bytes of its `Const` tensors, serialized `GraphDef` size, op types of
the main graph, the largest library functions and the one holding the update's kernels, against
`trainable_variables`: docs/benchmarks.md "The per-variable update (session 6)"); for train,
the bytes of the forward tensors the gradient ops read (`saved_for_backward`: the forward pass is
what the step's `loss` depends on through data edges, minus everything downstream of the tape's
ops; a forward tensor read by any other live op counts once per buffer: views made by
Reshape/Identity/IdentityN/ExpandDims/Squeeze count as their input, unknown dimensions as
`--batch_size`), split by the kind of op and the layer that produced them. With shared network
functions (`nn.shared_function`, the default) the tensors a network's backward function reads
are outputs of its forward call, each counted as its own buffer (the views inside the function
are not seen), so `saved_for_backward` over-counts (`small` b16: 928 MB against 514 MB inlined,
while the allocator's peak fell); use `--no_shared_functions` for that column.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import resource
import sys
import time

_ALIASING_OPS = {'Reshape', 'Identity', 'ExpandDims', 'Squeeze', 'StopGradient', 'Snapshot'}


def _rss_mb():
  """`(peak, current)` resident set in MB (`ru_maxrss`, `/proc/self/status` VmRSS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  current = float('nan')
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          current = int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return peak, current


class Stages:
  """Records RSS and TF's CPU allocator statistics after each named stage."""

  def __init__(self):
    self.rows = []
    self._start = time.perf_counter()

  def mark(self, name):
    import tensorflow as tf

    peak, current = _rss_mb()
    row = {'stage': name, 'peak_rss_mb': peak, 'rss_mb': current}
    try:
      info = tf.config.experimental.get_memory_info('CPU:0')
      row['tensors_mb'] = info['current'] / 2**20
      row['tensors_peak_mb'] = info['peak'] / 2**20
      tf.config.experimental.reset_memory_stats('CPU:0')
    except (ValueError, RuntimeError):
      pass
    row['elapsed_s'] = time.perf_counter() - self._start
    self.rows.append(row)
    print(
      f'[{row["elapsed_s"]:7.1f}s] {name:<18} peak RSS {peak:8.0f} MB  RSS {current:8.0f} MB'
      + (
        f'  tensors {row["tensors_mb"]:7.0f} MB (peak {row["tensors_peak_mb"]:7.0f})'
        if 'tensors_mb' in row
        else ''
      ),
      flush=True,
    )


def _bytes_of(variables):
  import tensorflow as tf

  return int(sum(v.shape.num_elements() * tf.as_dtype(v.dtype).size for v in variables))


def _tensor_bytes(tensor, batch_size):
  import tensorflow as tf

  shape = tensor.shape
  if shape.rank is None:
    return 0, True
  n, unknown = 1, False
  for d in shape:
    if d is None:
      d, unknown = batch_size, True
    n *= d
  dtype = tf.as_dtype(tensor.dtype)
  if dtype in (tf.resource, tf.variant, tf.string):
    return 0, False
  return n * dtype.size, unknown


def graph_stats(concrete_function):
  """Nodes, `Const` bytes and serialized size of a traced function and its library.

  Also the main graph's op types (`main_top_ops`), the biggest library functions with theirs
  (`largest_functions`: name, nodes, top op types) and the functions that apply the update
  (`update_functions`: name, nodes, `ResourceApply*` kernels; before session 10 the training
  step's update was a `tf.cond` branch, `cond_true_*`; since, the kernels are in the main graph
  and this list is empty for `optim.Adamax`).
  """
  from tensorflow.python.framework import tensor_util

  graph_def = concrete_function.graph.as_graph_def()
  nodes = list(graph_def.node)
  for fn in graph_def.library.function:
    nodes.extend(fn.node_def)
  const_bytes = 0
  op_types = collections.Counter()
  for node in nodes:
    op_types[node.op] += 1
    if node.op == 'Const' and 'value' in node.attr:
      const_bytes += tensor_util.MakeNdarray(node.attr['value'].tensor).nbytes
  functions = sorted(graph_def.library.function, key=lambda fn: -len(fn.node_def))
  return {
    'nodes': len(nodes),
    'main_graph_nodes': len(graph_def.node),
    'library_functions': len(graph_def.library.function),
    'const_mb': const_bytes / 2**20,
    'graph_def_mb': graph_def.ByteSize() / 2**20,
    'top_ops': op_types.most_common(12),
    'main_top_ops': collections.Counter(node.op for node in graph_def.node).most_common(8),
    'largest_functions': [
      (
        fn.signature.name,
        len(fn.node_def),
        collections.Counter(node.op for node in fn.node_def).most_common(6),
      )
      for fn in functions[:3]
    ],
    'update_functions': [
      (fn.signature.name, len(fn.node_def), kernels)
      for fn in functions
      for kernels in [sum(node.op.startswith('ResourceApply') for node in fn.node_def)]
      if kernels
    ],
  }


def _buffer_root(tensor):
  """The tensor whose buffer `tensor` shares (through reshapes, identities)."""
  while True:
    if tensor.op.type == 'IdentityN':
      tensor = tensor.op.inputs[tensor.value_index]
    elif tensor.op.type in _ALIASING_OPS and tensor.op.inputs:
      tensor = tensor.op.inputs[0]
    else:
      return tensor


def _ancestors(tensors):
  """Names of the ops `tensors` depend on through data inputs (not automatic control edges).

  An `IdentityN` output depends on its own input only (the default strategy's all-reduce and
  `tf.custom_gradient` pass gradients and forward values through one `IdentityN`).
  """
  seen, stack = set(), list(tensors)
  done = set()
  while stack:
    t = stack.pop()
    if t.name in done:
      continue
    done.add(t.name)
    seen.add(t.op.name)
    if t.op.type == 'IdentityN':
      stack.append(t.op.inputs[t.value_index])
    else:
      stack.extend(t.op.inputs)
  return seen


def saved_for_backward(concrete_function, loss, batch_size, top=0):
  """Bytes of forward tensors read by the gradient ops, by producing op type (one per buffer).

  Forward ops are the ancestors of `loss` (a tensor of the function's graph); a forward tensor
  is saved when an op outside the forward pass (the gradient) reads it.
  """
  graph = concrete_function.graph
  forward = _ancestors([loss])
  # Gradient ops feed the update, which feeds the outputs through IdentityN ops: everything
  # downstream of the tape's ops is not forward.
  stack = [op for op in graph.get_operations() if op.name.startswith('gradient_tape/')]
  backward = set()
  while stack:
    op = stack.pop()
    if op.name in backward:
      continue
    backward.add(op.name)
    stack.extend(c for t in op.outputs for c in t.consumers())
  forward -= backward
  by_type, by_scope = collections.Counter(), collections.Counter()
  seen, biggest = {}, []
  unknown = 0
  for op in graph.get_operations():
    if op.name in forward:
      continue
    if op.type in ('Identity', 'IdentityN') and not any(t.consumers() for t in op.outputs):
      continue  # dead (tf.custom_gradient leaves one per call); grappler prunes it
    for t in op.inputs:
      if t.op.name not in forward:
        continue
      root = _buffer_root(t)
      if root.op.type in ('Const', 'ReadVariableOp', 'Placeholder', 'VarHandleOp'):
        continue
      if root.name in seen:
        continue
      size, is_unknown = _tensor_bytes(root, batch_size)
      seen[root.name] = size
      unknown += is_unknown
      by_type[root.op.type] += size
      layer = root.op.name.split('/')
      by_scope['/'.join(_strip_number(p) for p in layer[1:-1]) or layer[0]] += size
  biggest = sorted(seen.items(), key=lambda kv: -kv[1])[:top]
  return {
    'saved_mb': sum(seen.values()) / 2**20,
    'tensors': len(seen),
    'with_unknown_dims': unknown,
    'by_op_mb': {k: v / 2**20 for k, v in by_type.most_common(15)},
    'by_layer_mb': {k: v / 2**20 for k, v in by_scope.most_common(25)},
    'biggest_mb': [(k, v / 2**20) for k, v in biggest],
  }


def _loss_tensor(concrete_function):
  """The training step's `loss` output inside its graph."""
  import tensorflow as tf

  outputs = tf.nest.flatten(concrete_function.structured_outputs, expand_composites=True)
  keys = sorted(concrete_function.structured_outputs)  # tf.nest flattens dicts by sorted key
  return outputs[keys.index('loss')]


def _strip_number(part):
  """`dense_layer_70_1` -> `dense_layer`: the layer kind without Keras's instance numbers."""
  words = part.split('_')
  while words and words[-1].isdigit():
    words.pop()
  return '_'.join(words) or part


def _patch_static_batch(cls):
  """`_unless_empty` with the batch size taken from `tf.shape(x)[0]`'s static shape when known.

  `tf.get_static_value(tf.shape(x)[0])` is None while tracing even when `x.shape[0]` is known
  (`tf.shape(x)` is a Const then, but `get_static_value` does not evaluate the StridedSlice), so
  the eval and sample graphs put the whole model in one `tf.cond` branch (an `If` op and a
  library function). model.py reads `x.shape[0]` itself since session 4, so this patch changes
  nothing there (it is kept to measure older revisions).
  """
  original = cls._unless_empty

  def unless_empty(self, batch, compute, empty):
    import tensorflow as tf

    op = getattr(batch, 'op', None)
    if op is not None and op.type == 'StridedSlice':  # tf.shape(x)[0]; the shape is a Const
      shape = tf.get_static_value(op.inputs[0])
      if shape is not None and shape.ndim == 1:
        return compute() if shape[0] > 0 else empty()
    return original(self, batch, compute, empty)

  cls._unless_empty = unless_empty


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--phase', choices=['train', 'eval', 'sample'], default='train')
  parser.add_argument('--steps', type=int, default=3, help='calls after the first one')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--recompute_grad', action='store_true')
  parser.add_argument('--via_bench', action='store_true', help='eval/sample: build_phases too')
  parser.add_argument(
    '--forward_first', action='store_true', help='train: trace and run the forward pass alone first'
  )
  parser.add_argument(
    '--static_batch',
    action='store_true',
    help='experiment: DenseFlow._unless_empty reads a static batch size from the shape op '
    '(no tf.cond around the whole eval/sample graph)',
  )
  parser.add_argument(
    '--grappler',
    default='',
    help='experiment: tf.config.optimizer options, e.g. remapping=false,memory_optimization=false',
  )
  parser.add_argument(
    '--no_shared_functions',
    action='store_true',
    help='inline every network (nn.shared_function.ENABLED = False), as before session 5',
  )
  parser.add_argument(
    '--keep_concatenations',
    action='store_true',
    help='the dense blocks keep their concatenations for the backward pass, as before session 7 '
    '(nn.recompute.ENABLED = False)',
  )
  parser.add_argument('--no_graph_stats', action='store_true')
  parser.add_argument('--top', type=int, default=10, help='list the biggest saved tensors')
  parser.add_argument('--json', default=None)
  args = parser.parse_args(argv)

  stages = Stages()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import keras  # noqa: F401
  import numpy as np
  import tensorflow as tf
  import tensorflow_probability as tfp  # noqa: F401

  from tf_denseflow import (
    bench,
    train_step,  # noqa: F401
  )
  from tf_denseflow import model as model_lib
  from tf_denseflow import train_lib as loop_lib  # the training loop's noise and loss helpers

  stages.mark('imports')
  if args.no_shared_functions:
    from tf_denseflow.nn import shared_function

    shared_function.ENABLED = False
  if args.keep_concatenations:
    from tf_denseflow.nn import recompute

    recompute.ENABLED = False
  if args.grappler:
    options = {}
    for item in args.grappler.split(','):
      key, _, value = item.partition('=')
      options[key] = {'true': True, 'false': False}.get(value.lower(), value)
    tf.config.optimizer.set_experimental_options(options)
  if args.static_batch:
    _patch_static_batch(model_lib.DenseFlow)
  config = bench.make_config(args.preset, args.image_size, 'float32', args.recompute_grad)
  result = {'args': vars(args), 'stages': stages.rows}

  # Marks 'model' and 'init' around `DenseFlow.initialize`, also inside `bench.build_phases`.
  original_initialize = model_lib.DenseFlow.initialize

  def initialize(self, *a, **k):
    stages.mark('model')
    out = original_initialize(self, *a, **k)
    stages.mark('init')
    return out

  model_lib.DenseFlow.initialize = initialize
  if args.phase == 'train' or args.via_bench:
    parts = bench.build_phases(config, args.batch_size, seed=args.seed)
    model = parts['model']
    optimizer_slots = None
    if args.phase == 'train':
      stages.mark('optimizer')
  else:
    # The model half of bench.build_phases: same data, seed, model and functions.
    rng = np.random.default_rng(args.seed)
    shape = (args.batch_size,) + tuple(config.image_shape)
    batches = [tf.constant(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(2)]
    model = model_lib.DenseFlow(config, seed=args.seed)
    model.initialize(batches[0])
    batch_size, seed = args.batch_size, args.seed
    parts = {
      'batches': batches,
      'eval': tf.function(lambda images, s: model.elbo(images, s), autograph=False),
      'sample': tf.function(lambda s: model.sample(batch_size, s), autograph=False),
      'seed_of': lambda i: tf.constant([seed, i], tf.int64),
    }
  model_lib.DenseFlow.initialize = original_initialize

  result['params'] = model.num_parameters()
  result['trainable_variables'] = len(model.trainable_variables)
  result['param_mb'] = _bytes_of(model.trainable_variables) / 2**20
  result['bn_stat_mb'] = _bytes_of(model.non_trainable_keras_variables) / 2**20
  if args.phase == 'train':
    # The optimizer is reachable through the train step's closure only: count its slots as
    # build_phases made them (Keras Adamax: m and u per variable, plus the iteration counter).
    optimizer_slots = 2 * result['param_mb']
    result['optimizer_slot_mb_est'] = optimizer_slots

  seed_of, batches = parts['seed_of'], parts['batches']
  if args.phase == 'train':
    fn = parts['train']
    # train_step(iterator[, multiplier]): pass what this version of train_step takes.
    arity = len(inspect.signature(fn.python_function).parameters)
    call_args = (parts['iterator'], parts.get('one'))[:arity]
    if args.forward_first:
      noise = loop_lib.replica_noise(
        model, tf.constant([0, 1], tf.int64), 0, args.batch_size, args.batch_size
      )
      forward = tf.function(
        lambda images, n: loop_lib.nll_given_noise(model, images, n, training=True),
        autograph=False,
      )
      forward.get_concrete_function(batches[0], noise)
      stages.mark('forward_traced')
      forward(batches[0], noise).numpy()
      stages.mark('forward_1st_call')
  elif args.phase == 'eval':
    fn, call_args = parts['eval'], (batches[0], seed_of(0))
  else:
    fn, call_args = parts['sample'], (seed_of(0),)

  concrete = fn.get_concrete_function(*call_args)
  stages.mark('traced')

  def call(i):
    if args.phase == 'train':
      out = fn(*call_args)
    elif args.phase == 'eval':
      out = fn(batches[i % 2], seed_of(i))
    else:
      out = fn(seed_of(i))
    for t in tf.nest.flatten(out):
      t.numpy()

  call(0)
  stages.mark('1st_call')
  for i in range(1, args.steps + 1):
    call(i)
  stages.mark(f'{args.steps}_more_calls')
  if not args.no_graph_stats:  # last: serialising the graph raises the peak
    result['graph'] = graph_stats(concrete)
    if args.phase == 'train':
      loss = _loss_tensor(concrete)
      result['saved_for_backward'] = saved_for_backward(
        concrete, loss, args.batch_size, top=args.top
      )

  print(json.dumps({k: v for k, v in result.items() if k != 'stages'}, indent=1))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
