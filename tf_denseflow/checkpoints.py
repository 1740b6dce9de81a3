"""Restoring a checkpoint all or nothing, checked against the model config it was written for.

`restore_checkpoint` is what every program (train's resume, evaluate, sample, export,
convert_torch) restores through (usually via `workdir.restore_model`): the checkpoint must have
been written for the expected model config (stored with it under `MODEL_CONFIG_KEY`), every
variable of the objects restored must find a value of its shape in the checkpoint, and every
model variable of the checkpoint must find a variable here. Anything else stops with a one-line
`CheckpointError` naming the mismatch; no program runs on a partly restored model. The run
directory's layout (where checkpoints and configs live) is `workdir.py`'s.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tf_denseflow.config import DenseFlowConfig

__all__ = [
  'CheckpointError',
  'MODEL_CONFIG_KEY',
  'WEIGHT_NEUTRAL_FIELDS',
  'checkpoint_model_config',
  'config_differences',
  'config_from_fields',
  'config_json',
  'model_config_variable',
  'nonfinite_variables',
  'one_line',
  'preview',
  'restore_checkpoint',
]

# The checkpoint object holding the model config (JSON string) the checkpoint was written for.
MODEL_CONFIG_KEY = 'model_config'
# Config fields that change neither the variables nor the function (only how it is computed):
# a checkpoint restores into a model that differs from its own config only in these.
WEIGHT_NEUTRAL_FIELDS = ('use_recompute_grad', 'coupling_dtype')
_VALUE = 'VARIABLE_VALUE'


class CheckpointError(ValueError):
  """A workdir, config file or checkpoint cannot be used; the message names the file and why."""


def one_line(error: BaseException) -> str:
  """The first non-empty line of an error's message (or its type's name)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


# -------------------------------------------------------------------------------------------------
# The model config stored with a checkpoint.


def config_json(config: DenseFlowConfig) -> str:
  """The config as sorted, indented JSON (the file and the checkpoint hold the same text)."""
  return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)


def config_from_fields(fields, source: str) -> DenseFlowConfig:
  """A `DenseFlowConfig` from JSON fields (unknown ones ignored).

  Raises:
    CheckpointError: not a JSON object or not a valid config (the message names `source`).
  """
  if not isinstance(fields, dict):
    raise CheckpointError(f'{source}: not a model config (a JSON object), got {fields!r:.80}.')
  names = {f.name for f in dataclasses.fields(DenseFlowConfig)}
  try:
    return DenseFlowConfig(**{k: v for k, v in fields.items() if k in names})
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'{source}: invalid model config: {one_line(e)}') from None


def config_differences(
  saved: DenseFlowConfig, current: DenseFlowConfig, ignore: Sequence[str] = WEIGHT_NEUTRAL_FIELDS
) -> List[Tuple[str, object, object]]:
  """`(field, saved value, current value)` of every field (but `ignore`) that differs."""
  a, b = dataclasses.asdict(saved), dataclasses.asdict(current)
  plain = lambda v: tuple(plain(x) for x in v) if isinstance(v, (list, tuple)) else v  # noqa: E731
  return [
    (k, plain(a[k]), plain(b[k])) for k in a if k not in ignore and plain(a[k]) != plain(b[k])
  ]


def model_config_variable(config: DenseFlowConfig) -> tf.Variable:
  """The config as a string variable, saved with the checkpoint under `MODEL_CONFIG_KEY`."""
  with tf.device('CPU:0'):
    return tf.Variable(config_json(config), trainable=False, name=MODEL_CONFIG_KEY)


# -------------------------------------------------------------------------------------------------
# Reading and matching a checkpoint.


# What reading a damaged checkpoint raises (TF's reader passes some C++ errors on as IndexError).
_READ_ERRORS = (tf.errors.OpError, ValueError, IndexError, RuntimeError, TypeError)


def _reader(path: str):
  try:
    return tf.train.load_checkpoint(path)
  except _READ_ERRORS as e:
    raise CheckpointError(f'{path}: not a readable checkpoint ({one_line(e)}).') from None


def _get_tensor(reader, key: str, path: str):
  try:
    return reader.get_tensor(key)
  except _READ_ERRORS as e:
    raise CheckpointError(f'{path}: cannot read {key} ({one_line(e)}).') from None


def checkpoint_model_config(path: str) -> Optional[DenseFlowConfig]:
  """The model config a checkpoint was written for, or None if it has none stored.

  Raises:
    CheckpointError: unreadable checkpoint or config.
  """
  reader = _reader(path)
  key = f'{MODEL_CONFIG_KEY}/.ATTRIBUTES/{_VALUE}'
  if not reader.has_tensor(key):
    return None
  value = _get_tensor(reader, key, path)
  try:
    fields = json.loads(value)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f'{path}: unreadable stored model config ({one_line(e)}).') from None
  return config_from_fields(fields, f'{path} (stored model config)')


def _object_graph(reader, path: str):
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  try:
    graph.ParseFromString(_get_tensor(reader, '_CHECKPOINTABLE_OBJECT_GRAPH', path))
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 -- protobuf's DecodeError and friends: a damaged file.
    raise CheckpointError(f'{path}: unreadable object graph ({one_line(e)}).') from None
  return graph


def _match(objects: Mapping[str, object], graph) -> Tuple[Dict[str, tuple], Dict[str, str]]:
  """Pairs the Python object graph under `objects` with the checkpoint's, by child names.

  This is the matching `tf.train.Checkpoint.restore` does (an object reachable by several paths
  is matched through any path the checkpoint has). Returns `(variables, matched)`: every
  variable reachable from `objects`, `path -> (variable, checkpoint key or None)`, and the
  checkpoint keys reached, `key -> path`.
  """
  found: Dict[int, tuple] = {}  # id(variable) -> (path, variable, key)
  with_node, without_node = set(), set()
  root = {c.local_name: c.node_id for c in graph.nodes[0].children}
  queue = collections.deque(
    (name, obj, root.get(name)) for name, obj in objects.items() if obj is not None
  )
  while queue:
    path, obj, node_id = queue.popleft()
    if id(obj) in with_node or (node_id is None and id(obj) in without_node):
      continue
    (with_node if node_id is not None else without_node).add(id(obj))
    node = graph.nodes[node_id] if node_id is not None else None
    if isinstance(obj, (tf.Variable, keras.Variable)):
      key = None
      if node is not None:
        key = next((a.checkpoint_key for a in node.attributes if a.name == _VALUE), None)
      if id(obj) not in found or (key is not None and found[id(obj)][2] is None):
        found[id(obj)] = (path, obj, key)
      continue
    children = {c.local_name: c.node_id for c in node.children} if node is not None else {}
    for name, child in tf.train.TrackableView.children(obj).items():
      queue.append((f'{path}/{name}', child, children.get(name)))
  variables = {path: (obj, key) for path, obj, key in found.values()}
  matched = {key: path for path, _, key in found.values() if key is not None}
  return variables, matched


def _subtree_values(graph, name: str) -> List[str]:
  """The checkpoint keys of every variable value reachable from the root's child `name`."""
  root = {c.local_name: c.node_id for c in graph.nodes[0].children}
  if name not in root:
    return []
  keys, seen, queue = [], set(), collections.deque([root[name]])
  while queue:
    node_id = queue.popleft()
    if node_id in seen:
      continue
    seen.add(node_id)
    node = graph.nodes[node_id]
    keys += [a.checkpoint_key for a in node.attributes if a.name == _VALUE]
    queue.extend(c.node_id for c in node.children)
  return keys


def preview(items: Sequence[str], n: int = 3) -> str:
  """The first `n` items, comma-separated, and how many more."""
  items = list(items)
  more = f' and {len(items) - n} more' if len(items) > n else ''
  return ', '.join(items[:n]) + more


def restore_checkpoint(
  path: str,
  objects: Mapping[str, object],
  config: Optional[DenseFlowConfig] = None,
  config_source: str = 'the model config',
  exclusive: Sequence[str] = ('model',),
  optional: Sequence[str] = (),
) -> None:
  """Restores `objects` from the checkpoint `path`, all or nothing.

  Checked before any value is assigned:
  - the model config stored with the checkpoint equals `config` (up to `WEIGHT_NEUTRAL_FIELDS`);
  - every variable reachable from `objects` has a value in the checkpoint, of the same shape;
  - the checkpoint holds no variable under the `exclusive` objects that is not restored (a
    checkpoint of a bigger model is another model, even if the smaller one is fully matched).
  Checkpoint objects that are not in `objects` are not read (e.g. the optimizer slots for
  evaluation: only what is passed in `objects` must be complete).

  Args:
    path: checkpoint prefix.
    objects: name -> trackable (`{'model': model, 'step': step, ...}`), as saved.
    config: the config the checkpoint must have been written for (None: not checked).
    config_source: where `config` comes from (for the message).
    exclusive: names in `objects` whose checkpoint subtree must be consumed entirely.
    optional: names in `objects` restored only if the checkpoint has them (else left as they
      are: e.g. float16's loss scale, absent from a checkpoint written in float32).

  Raises:
    CheckpointError: unreadable checkpoint, other model config, missing / unexpected /
      mis-shaped variables; one line naming the checkpoint and the mismatch.
  """
  reader = _reader(path)
  if config is not None:
    saved = checkpoint_model_config(path)
    if saved is not None:
      diffs = config_differences(saved, config)
      if diffs:
        text = '; '.join(f'{k} {_show(a)} vs {_show(b)}' for k, a, b in diffs)
        raise CheckpointError(
          f'checkpoint {path} was written for a different model config: {text} (checkpoint vs '
          f'{config_source}).'
        )
  graph = _object_graph(reader, path)
  present = {c.local_name for c in graph.nodes[0].children}
  objects = {k: v for k, v in objects.items() if k not in optional or k in present}
  variables, matched = _match(objects, graph)
  shapes = reader.get_variable_to_shape_map()
  missing = [p for p, (_, key) in variables.items() if key is None or key not in shapes]
  reshaped = [
    f'{p} {tuple(shapes[key])} vs {tuple(v.shape)}'
    for p, (v, key) in variables.items()
    if key in shapes and tuple(shapes[key]) != tuple(v.shape)
  ]
  unexpected = sorted(
    {k for name in exclusive for k in _subtree_values(graph, name) if k not in matched}
  )
  problems = []
  if missing:
    problems.append(f'{len(missing)} variable(s) not in the checkpoint ({preview(missing)})')
  if unexpected:
    names = [k[: -len(f'/.ATTRIBUTES/{_VALUE}')] for k in unexpected]
    problems.append(f'{len(names)} checkpoint variable(s) not in the model ({preview(names)})')
  if reshaped:
    problems.append(f'{len(reshaped)} with another shape ({preview(reshaped)})')
  if problems:
    raise CheckpointError(
      f'checkpoint {path} does not match {config_source}: ' + '; '.join(problems) + '.'
    )
  try:
    status = tf.train.Checkpoint(**objects).restore(path)
    status.assert_existing_objects_matched()  # checked above; kept as the library's own check
    status.expect_partial()  # objects not asked for (see the docstring) stay unread, by design
  except (AssertionError,) + _READ_ERRORS as e:
    raise CheckpointError(f'checkpoint {path}: restore failed ({one_line(e)}).') from None


def _show(value) -> str:
  return str(tuple(value)) if isinstance(value, (list, tuple)) else repr(value)


def nonfinite_variables(variables: Sequence, names: Optional[Sequence[str]] = None) -> List[str]:
  """Names of the floating-point variables holding NaN or Inf (in the variables' dtype)."""
  bad = []
  for i, v in enumerate(variables):
    if not tf.as_dtype(v.dtype).is_floating:
      continue
    if not np.all(np.isfinite(np.asarray(tf.convert_to_tensor(v)))):
      bad.append(names[i] if names is not None else getattr(v, 'path', None) or v.name)
  return bad
