"""Convert an official DenseFlow PyTorch checkpoint into a tf_denseflow workdir.

```
python -m tf_denseflow.convert_torch --checkpoint=check/checkpoint.pt --image_size=32 \
    --out=runs/cifar10_official [--preset=denseflow_74_10] [--step=N]
```
reads the authors' checkpoint (`.pt` through `torch.load(..., weights_only=True)`: `{'model':
state_dict, 'optimizer': ..., ...}` or a bare state_dict; or an `.npz` of the state_dict, keys
optionally prefixed `param/`), infers the architecture from the key names and shapes
(`config_from_state_dict`), maps every key onto the model's variables (`load_state_dict`) and
writes `OUT/model_config.json` + `OUT/checkpoints/ckpt-STEP`, the layout that
`tf_denseflow.evaluate`, `sample` and `export` restore (`workdir.restore_model`). A missing,
unexpected, mis-shaped or non-finite (in float32) key is refused with a one-line `error: ...`
(exit code 2), as is a damaged file; nothing is written then.

The mapping (github.com/matejgrcic/DenseFlow): conv kernels NCHW `(out, in, kh, kw)` -> `(kh, kw,
in, out)`; 1x1-conv matrices as they are (`z = x @ W^T` here, `F.conv2d(x, W[:, :, None, None])`
there); ActNorm and base `(1, C, 1, 1)` -> `(C,)`; BatchNorm `weight, bias, running_mean,
running_var` -> `gamma, beta, moving_mean, moving_variance`. Buffers that carry no state here
(`initialized`, `ldj_per_dim`, the shift bijection's constants, the sigmoid temperature,
`num_batches_tracked`, transition dist buffers) are checked for their expected values and
otherwise skipped. docs/parity.md lists every place where matching the official model needed a
special case.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import zipfile
import zlib
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = [
  'ConversionError',
  'config_from_state_dict',
  'convert_checkpoint',
  'define_convert_flags',
  'load_state_dict',
  'official_key_map',
  'read_state_dict',
]

_TORCH_SUFFIXES = ('.pt', '.pth', '.tar', '.ckpt', '.bin')
_PRESETS = ('denseflow_74_10', 'small', 'tiny')
_INT32_MAX, _INT64_MAX = 2**31 - 1, 2**63 - 1
# Config fields a state_dict cannot tell (no parameters carry them): taken from the defaults, a
# preset or the caller's overrides.
_NOT_INFERABLE = (
  'attention_landmarks',
  'attention_tokens',
  'squeeze_order',
  'coupling_dtype',
  'use_recompute_grad',
)


class ConversionError(ValueError):
  """A state_dict does not match the model: missing, unexpected or mis-shaped keys."""


# -------------------------------------------------------------------------------------------------
# Official key -> variable map.


def _conv(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))


def _vec(w: np.ndarray) -> np.ndarray:
  return np.reshape(w, [-1])


def _same(w: np.ndarray) -> np.ndarray:
  return w


# A map entry: official key -> (variable, transform of the official array).
KeyMap = Dict[str, Tuple[object, Callable[[np.ndarray], np.ndarray]]]


def _conv_layer(prefix: str, layer, out: KeyMap) -> None:
  out[f'{prefix}.weight'] = (layer.kernel, _conv)
  if layer.bias is not None:
    out[f'{prefix}.bias'] = (layer.bias, _same)


def _dense_block(prefix: str, block, out: KeyMap) -> None:
  for j, dense_layer in enumerate(block.dense_layers):
    _conv_layer(f'{prefix}.{j}.nn.0', dense_layer.conv_in, out)
    _conv_layer(f'{prefix}.{j}.nn.2', dense_layer.conv_out, out)
  _conv_layer(f'{prefix}.{len(block.dense_layers)}.conv', block.gate.conv, out)


def _coupling_network(prefix: str, net, out: KeyMap) -> None:
  _conv_layer(f'{prefix}.transform.0', net.project, out)
  mid = f'{prefix}.transform.1'
  _dense_block(f'{mid}.dense', net.dense, out)
  if net.attention is not None:
    _conv_layer(f'{mid}.mha.qkv', net.attention.qkv, out)
    _conv_layer(f'{mid}.mha.out_transform', net.attention.out, out)
  out[f'{mid}.mix_conv.0.weight'] = (net.norm.gamma, _same)
  out[f'{mid}.mix_conv.0.bias'] = (net.norm.beta, _same)
  out[f'{mid}.mix_conv.0.running_mean'] = (net.norm.moving_mean, _same)
  out[f'{mid}.mix_conv.0.running_var'] = (net.norm.moving_variance, _same)
  _conv_layer(f'{mid}.mix_conv.2', net.mix, out)
  _conv_layer(f'{prefix}.transform.2', net.out, out)


def official_key_map(model) -> KeyMap:
  """Every official state_dict key that carries state, mapped to a variable of `model`."""
  out: KeyMap = {}
  flow = model.bijector
  out['base_dist.loc'] = (flow.base.shift, _vec)
  out['base_dist.log_scale'] = (flow.base.log_scale, _vec)
  deq = model.dequantizer
  if hasattr(deq, 'context_net'):
    enc = 'transforms.0.encoder'
    out[f'{enc}.base_dist.loc'] = (deq.loc, _vec)
    out[f'{enc}.base_dist.log_scale'] = (deq.log_scale, _vec)
    for k, conv in enumerate(deq.convs):
      out[f'{enc}.transforms.{2 * k}.weight'] = (conv.kernel, _same)
    for k, coupling in enumerate(deq.couplings):
      net = coupling.conditioner
      prefix = f'{enc}.transforms.{2 * k + 1}.coupling_net.0'
      _conv_layer(f'{prefix}.transform.0', net.project, out)
      _dense_block(f'{prefix}.transform.1.dense', net.dense, out)
      _conv_layer(f'{prefix}.transform.2', net.out, out)
    ctx = deq.context_net
    _dense_block(f'{enc}.context_init.1', ctx.dense_in, out)
    _conv_layer(f'{enc}.context_init.2', ctx.down, out)
    _dense_block(f'{enc}.context_init.3', ctx.dense_out, out)
  for b, block in enumerate(flow.blocks):
    t = f'transforms.{3 + 2 * b}'
    for i, coupling in enumerate(block.couplings):
      if coupling is not None:
        _conv_layer(f'{t}.noise_params.{i}.transformation.0', coupling.network.hidden, out)
        _conv_layer(f'{t}.noise_params.{i}.transformation.2', coupling.network.out, out)
    for i, unit in enumerate(block.units):
      for s, step in enumerate(unit):
        p = f'{t}.blocks.{i}.transforms.{s}.transforms'
        out[f'{p}.0.shift'] = (step.act_norm.shift, _vec)
        out[f'{p}.0.log_scale'] = (step.act_norm.log_scale, _vec)
        out[f'{p}.1.weight'] = (step.conv1x1.kernel, _same)
        _coupling_network(f'{p}.2.coupling_net.0.dn', step.coupling.conditioner, out)
  return out


def _stateless_buffer(key: str) -> bool:
  return (
    key.endswith('.initialized')
    or key.endswith('num_batches_tracked')
    or key.endswith('.temperature')
    or key.endswith('.dist.buffer')
    or key in ('transforms.0.ldj_per_dim', 'transforms.1._shift', 'transforms.1._scale')
  )


def _check_buffer(key: str, value: np.ndarray, num_bits: int) -> None:
  expected = None
  if key.endswith('.initialized'):
    expected = 1.0
  elif key.endswith('.temperature') or key == 'transforms.1._scale':
    expected = 1.0
  elif key == 'transforms.1._shift':
    expected = -0.5
  elif key == 'transforms.0.ldj_per_dim':
    expected = -num_bits * np.log(2.0)
  if expected is None:
    return
  try:
    close = np.allclose(np.asarray(value, np.float64), expected, atol=1e-6)
  except (TypeError, ValueError):
    close = False
  if not close:
    raise ConversionError(f'{key}: expected {expected}, got {np.asarray(value).ravel()[:4]}.')


def load_state_dict(model, state_dict: Dict[str, np.ndarray], strict: bool = True) -> List[str]:
  """Assigns an official state_dict (numpy arrays) to `model`'s variables.

  Marks every ActNorm as initialised. Nothing is assigned unless every key checks out.

  Args:
    model: a `DenseFlow` whose config matches the state_dict (`config_from_state_dict`).
    state_dict: official key -> numpy array (NCHW layouts, as `torch.save` stores them).
    strict: refuse keys the model has no variable for (buffers without state are always fine).

  Returns:
    The sorted list of official keys that were assigned.

  Raises:
    ConversionError: naming every missing, unexpected (with `strict=True`) or mis-shaped key, a
      non-finite value, or a buffer with an unexpected value (e.g. an uninitialised ActNorm).
  """
  key_map = official_key_map(model)
  missing = sorted(set(key_map) - set(state_dict))
  unexpected = sorted(k for k in state_dict if k not in key_map and not _stateless_buffer(k))
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing key(s): {_preview(missing)}')
  if unexpected and strict:
    problems.append(f'{len(unexpected)} unexpected key(s): {_preview(unexpected)}')
  for key, (variable, transform) in key_map.items():
    if key in state_dict:
      value = transform(np.asarray(state_dict[key]))
      if tuple(value.shape) != tuple(variable.shape):
        problems.append(
          f'{key}: shape {tuple(np.asarray(state_dict[key]).shape)} maps to {tuple(value.shape)},'
          f' the model expects {tuple(variable.shape)}'
        )
      elif not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
        problems.append(f'{key}: holds {value.dtype} values, not numbers')
      # Checked after the cast to float32, the dtype assigned: 1e39 in float64 becomes Inf.
      elif not np.all(np.isfinite(_as_float32(value))):
        problems.append(f'{key}: holds non-finite values (in float32)')
  if problems:
    raise ConversionError('State dict does not match the model: ' + '; '.join(problems))
  for key in state_dict:
    if _stateless_buffer(key):
      _check_buffer(key, state_dict[key], model.config.num_bits)
  for key, (variable, transform) in key_map.items():
    variable.assign(transform(np.asarray(state_dict[key], np.float32)))
  for step in model.bijector.steps:
    step.act_norm.initialized.assign(True)
  return sorted(key_map)


def _as_float32(value: np.ndarray) -> np.ndarray:
  with np.errstate(over='ignore', invalid='ignore'):  # overflow to Inf is what is checked
    return value.astype(np.float32)


def _preview(keys: Iterable[str], n: int = 5) -> str:
  keys = list(keys)
  more = f' (and {len(keys) - n} more)' if len(keys) > n else ''
  return ', '.join(keys[:n]) + more


# -------------------------------------------------------------------------------------------------
# Architecture inference.


def _shape(state_dict: Mapping[str, Any], key: str) -> Tuple[int, ...]:
  if key not in state_dict:
    raise ConversionError(f'Cannot infer the architecture: missing key {key}.')
  return tuple(int(d) for d in np.shape(state_dict[key]))


def _indices(keys: Iterable[str], pattern: str) -> List[Tuple[int, ...]]:
  """Integer groups of every key that fully matches `pattern`, sorted."""
  regex = re.compile(pattern)
  found = set()
  for key in keys:
    m = regex.fullmatch(key)
    if m:
      found.add(tuple(int(g) for g in m.groups()))
  return sorted(found)


def _count(keys: Iterable[str], pattern: str, what: str) -> int:
  """`1 + max index` of a key family, requiring indices `0..n-1` with no gap."""
  idx = [i[0] for i in _indices(keys, pattern)]
  if idx != list(range(len(idx))):
    raise ConversionError(f'Cannot infer {what}: indices {idx} are not 0..{len(idx) - 1}.')
  return len(idx)


def _infer_fields(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """The config fields that the key names and shapes determine."""
  keys = list(state_dict)
  fields: Dict[str, Any] = {}
  steps = _indices(
    keys, r'transforms\.(\d+)\.blocks\.(\d+)\.transforms\.(\d+)\.transforms\.0\.shift'
  )
  if not steps:
    raise ConversionError(
      'Not a DenseFlow state_dict: no key `transforms.T.blocks.U.transforms.S.transforms.0.shift` '
      f'(first keys: {_preview(sorted(keys), 3)}).'
    )
  blocks = sorted({t for t, _, _ in steps})
  if blocks != [3 + 2 * b for b in range(len(blocks))]:
    raise ConversionError(f'Dense blocks at transforms {blocks}, expected 3, 5, 7, ...')
  units, steps_per_unit, widths, in_channels = [], [], [], []
  growth, cross_in = set(), []
  for t in blocks:
    unit_ids = sorted({u for tt, u, _ in steps if tt == t})
    if unit_ids != list(range(len(unit_ids))):
      raise ConversionError(f'transforms.{t}: units {unit_ids} are not 0..{len(unit_ids) - 1}.')
    counts = {u: len([s for tt, uu, s in steps if tt == t and uu == u]) for u in unit_ids}
    if len(set(counts.values())) != 1:
      raise ConversionError(f'transforms.{t}: units have different numbers of steps {counts}.')
    units.append(len(unit_ids))
    steps_per_unit.append(counts[0])
    step0 = f'transforms.{t}.blocks.0.transforms.0.transforms'
    widths.append(_shape(state_dict, f'{step0}.2.coupling_net.0.dn.transform.0.weight')[0])
    channels = [
      _shape(state_dict, f'transforms.{t}.blocks.{u}.transforms.0.transforms.0.shift')[1]
      for u in unit_ids
    ]
    in_channels.append(channels[0])
    if len(channels) > 1:
      growth.add(channels[1] - channels[0])
      if any(c - channels[0] != i * (channels[1] - channels[0]) for i, c in enumerate(channels)):
        raise ConversionError(f'transforms.{t}: unit widths {channels} do not grow linearly.')
      hidden = f'transforms.{t}.noise_params.0.transformation.0.weight'
      cross_in.append(
        (channels[0], _shape(state_dict, hidden)[1] if hidden in state_dict else None)
      )
      out = f'transforms.{t}.noise_params.0.transformation.2.weight'
      if out in state_dict:
        growth.add(_shape(state_dict, out)[0] // 2)
  if len(growth) > 1:
    raise ConversionError(f'Inconsistent growth rates {sorted(growth)} across blocks.')
  fields.update(
    units_per_block=tuple(units),
    steps_per_unit=tuple(steps_per_unit),
    coupling_channels=tuple(widths),
  )
  if growth:
    fields['growth_rate'] = growth.pop()
  if cross_in:
    has_net = {n is not None for _, n in cross_in}
    if len(has_net) > 1:
      raise ConversionError('Some dense blocks have cross-unit networks (noise_params), some not.')
    fields['use_cross_unit_coupling'] = has_net.pop()
    if fields['use_cross_unit_coupling']:
      # g_1 sees the block input x (official) or [x, y_0] (paper-clean, y_0 as wide as x).
      previous = {n == 2 * c0 for c0, n in cross_in}
      if any(n not in (c0, 2 * c0) for c0, n in cross_in) or len(previous) > 1:
        raise ConversionError(f'Unexpected cross-unit input widths {cross_in} (channels, g_1 in).')
      fields['cross_unit_include_previous'] = previous.pop()
  net = 'transforms.3.blocks.0.transforms.0.transforms.2.coupling_net.0.dn.transform.1'
  fields['dense_depth'] = _count(keys, re.escape(net) + r'\.dense\.(\d+)\.nn\.0\.weight', 'depth')
  fields['dense_growth'] = _shape(state_dict, f'{net}.dense.0.nn.2.weight')[0]
  fields['use_attention'] = f'{net}.mha.qkv.weight' in state_dict
  enc = 'transforms.0.encoder'
  if any(k.startswith(enc + '.') for k in keys):
    fields['dequantization'] = 'variational'
    couplings = _indices(keys, re.escape(enc) + r'\.transforms\.(\d+)\.coupling_net\.0\..*')
    fields['dequant_steps'] = len(couplings)
    cnet = f'{enc}.transforms.1.coupling_net.0.transform'
    fields['dequant_mid_channels'] = _shape(state_dict, f'{cnet}.0.weight')[0]
    fields['dequant_depth'] = _count(
      keys, re.escape(cnet) + r'\.1\.dense\.(\d+)\.nn\.0\.weight', 'dequant_depth'
    )
    fields['dequant_growth'] = _shape(state_dict, f'{cnet}.1.dense.0.nn.2.weight')[0]
    ctx = f'{enc}.context_init'
    fields['dequant_context_channels'] = _shape(state_dict, f'{ctx}.2.weight')[0]
    fields['dequant_context_depth'] = _count(
      keys, re.escape(ctx) + r'\.1\.(\d+)\.nn\.0\.weight', 'dequant_context_depth'
    )
    fields['dequant_context_growth'] = _shape(state_dict, f'{ctx}.1.0.nn.2.weight')[0]
  else:
    fields['dequantization'] = 'uniform'
  if 'transforms.0.ldj_per_dim' in state_dict:
    # The uniform dequantization's log-det per dimension, -num_bits ln 2 (Glow's n_bits_x).
    try:
      bits = -float(np.asarray(state_dict['transforms.0.ldj_per_dim'], np.float64)) / math.log(2.0)
    except (TypeError, ValueError):
      raise ConversionError('transforms.0.ldj_per_dim: not a number.') from None
    if not math.isfinite(bits) or abs(bits - round(bits)) > 1e-4:
      raise ConversionError(
        f'transforms.0.ldj_per_dim = {-bits * math.log(2.0)} is not -num_bits ln 2.'
      )
    if not 1 <= round(bits) <= 8:
      raise ConversionError(
        f'transforms.0.ldj_per_dim = {-bits * math.log(2.0)} gives num_bits = {round(bits)}; '
        'num_bits must be in 1..8.'
      )
    fields['num_bits'] = int(round(bits))
  fields['_squeezed_channels'] = in_channels[0]
  return fields


def config_from_state_dict(state_dict: Mapping[str, Any], image_shape: Sequence[int], **overrides):
  """Infers the `DenseFlowConfig` of an official state_dict from its key names and shapes.

  Inferred: `units_per_block` (`transforms.{3,5,7}.blocks.U`), `steps_per_unit` (`...blocks.U.
  transforms.S`), `coupling_channels` (the coupling projection conv), `growth_rate` (ActNorm widths
  of successive units, and the `noise_params` output conv), `use_cross_unit_coupling` and
  `cross_unit_include_previous` (the `noise_params` input widths), `dense_depth`/`dense_growth`
  (dense layer keys), `use_attention` (`mha` keys), the dequantization flow's sizes (or 'uniform'
  when it has no parameters) and `num_bits` (`ldj_per_dim`). Not inferable, so from the defaults
  or `overrides`: `attention_landmarks` (official: 4), `attention_tokens`, `squeeze_order`,
  `coupling_dtype`, `use_recompute_grad`.

  Args:
    state_dict: official key -> array (only the shapes are read).
    image_shape: `(H, W)` or `(H, W, C)` of the data; the official checkpoints are 32x32x3
      (CIFAR-10, ImageNet32) or 64x64x3 (ImageNet64, CelebA). C defaults to the state_dict's.
    **overrides: further `DenseFlowConfig` fields.

  Returns:
    A `DenseFlowConfig`.

  Raises:
    ConversionError: the keys do not describe a DenseFlow, or contradict `image_shape`.
  """
  from tf_denseflow.config import DenseFlowConfig

  fields = _infer_fields(state_dict)
  squeezed = fields.pop('_squeezed_channels')
  image_shape = tuple(int(d) for d in image_shape)
  if len(image_shape) == 2:
    image_shape += (squeezed // 4,)
  if len(image_shape) != 3:
    raise ConversionError(f'`image_shape` must be (H, W) or (H, W, C), got {image_shape}.')
  if 4 * image_shape[2] != squeezed:
    raise ConversionError(
      f'The state_dict is for {squeezed // 4}-channel images (first unit: {squeezed} channels '
      f'after the squeeze), not {image_shape[2]}.'
    )
  fields.update(overrides)
  try:
    return DenseFlowConfig(image_shape=image_shape, **fields)
  except ValueError as e:
    raise ConversionError(f'Invalid config for image shape {image_shape}: {e}') from None


def _preset_config(preset: str, image_shape: Tuple[int, int, int]):
  from tf_denseflow.config import DenseFlowConfig

  if preset not in _PRESETS:
    raise ConversionError(f'Unknown preset {preset!r}; choose one of {", ".join(_PRESETS)}.')
  try:
    return getattr(DenseFlowConfig, preset)(image_shape)
  except ValueError as e:
    raise ConversionError(f'Preset {preset} at image shape {image_shape}: {e}') from None


def _check_preset(config, inferred) -> None:
  diffs = [
    f'{f.name}={getattr(inferred, f.name)!r} (preset: {getattr(config, f.name)!r})'
    for f in dataclasses.fields(config)
    if f.name not in _NOT_INFERABLE and getattr(config, f.name) != getattr(inferred, f.name)
  ]
  if diffs:
    raise ConversionError('The checkpoint is not the preset: ' + ', '.join(diffs) + '.')


# -------------------------------------------------------------------------------------------------
# Reading checkpoints.


def _to_numpy(value) -> np.ndarray:
  """A torch tensor or array-like as numpy (half-precision floats widened to float32)."""
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch here
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype.itemsize < 4:
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _unwrap(obj, path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """`(state_dict, info)` from a bare state_dict or the official `{'model': state_dict, ...}`."""
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{path}: holds a {type(obj).__name__}, not a dict.')
  info = {}
  if 'model' in obj and isinstance(obj['model'], Mapping):
    info = {k: obj[k] for k in ('current_epoch',) if isinstance(obj.get(k), int)}
    obj = obj['model']
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not hasattr(v, 'shape')]
  if bad:
    raise ConversionError(
      f'{path}: not a state_dict (entries that are not named arrays: {_preview(map(str, bad), 3)}).'
    )
  state = collections.OrderedDict(obj)
  # `DataParallel` (the official `--parallel dp`) prefixes every key with `module.`.
  if state and all(k.startswith('module.') for k in state):
    state = collections.OrderedDict((k[len('module.') :], v) for k, v in state.items())
  return state, info


def _read_torch(path: str):
  try:
    import torch
  except ImportError:
    raise ConversionError(
      f'{path}: reading a PyTorch checkpoint needs torch (pip install .[torch]), or convert it '
      'to an .npz of its state_dict first.'
    ) from None
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 -- torch raises several types; report them in one line.
    lines = [ln.strip() for ln in re.sub(r'\x1b\[[0-9;]*m', '', str(e)).splitlines() if ln.strip()]
    why = (
      [ln for ln in lines if ln.startswith('WeightsUnpickler error')] or lines or [type(e).__name__]
    )
    first = why[0]
    raise ConversionError(
      f'{path}: torch.load(weights_only=True) failed ({first}). Only plain tensors and containers '
      "are read (never arbitrary pickles): re-save checkpoint['model'] alone, or as an .npz."
    ) from None


def read_state_dict(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """Reads an official state_dict from a `.pt` checkpoint or an `.npz`.

  `.pt` (also `.pth`, `.tar`, `.ckpt`, `.bin`): `torch.load(path, map_location='cpu',
  weights_only=True)` (torch imported lazily); the official training code saves `{'model':
  state_dict, 'optimizer': ..., 'current_epoch': ...}`, a bare state_dict is accepted too.
  `.npz`: one array per official key (`np.load` without pickles); when some keys start with
  `param/` (the golden files' layout) only those are read, without the prefix. A `module.` prefix
  on every key (DataParallel) is removed.

  Returns:
    `(state_dict, info)`: official key -> numpy array, and `{'current_epoch': N}` when known.

  Raises:
    ConversionError: unreadable file, unknown suffix, not a state_dict, or torch missing.
    FileNotFoundError: no such file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No such checkpoint file: {path}')
  suffix = os.path.splitext(path)[1].lower()
  if suffix == '.npz':
    try:
      with np.load(path, allow_pickle=False) as data:
        names = list(data.files)
        if any(n.startswith('param/') for n in names):
          obj = {n[len('param/') :]: data[n] for n in names if n.startswith('param/')}
        else:
          obj = {n: data[n] for n in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
      raise ConversionError(f'{path}: not a readable .npz ({e}).') from None
  elif suffix in _TORCH_SUFFIXES:
    obj = _read_torch(path)
  else:
    raise ConversionError(
      f'{path}: unknown checkpoint type {suffix!r} (expected .npz or {", ".join(_TORCH_SUFFIXES)}).'
    )
  state, info = _unwrap(obj, path)
  return collections.OrderedDict((k, _to_numpy(v)) for k, v in state.items()), info


# -------------------------------------------------------------------------------------------------
# The conversion.


def convert_checkpoint(
  checkpoint: str,
  out: str,
  image_size: Sequence[int] | int,
  preset: Optional[str] = None,
  step: Optional[int] = None,
  strict: bool = True,
  overwrite: bool = False,
  log: Callable[[str], None] = print,
) -> str:
  """Converts an official checkpoint into the workdir `out`; returns the checkpoint path.

  Args:
    checkpoint: `.pt` or `.npz` file (see `read_state_dict`).
    out: the workdir to write (`model_config.json`, `checkpoints/ckpt-STEP`).
    image_size: `H` (square images) or `(H, W)`: the dataset's, not stored in the checkpoint.
    preset: optional `DenseFlowConfig` preset name; the checkpoint must match it, and it
      supplies the fields that the keys cannot tell (e.g. `attention_landmarks`).
    step: the global step to record (default 0).
    strict: refuse state_dict keys the model has no variable for.
    overwrite: allow `out` to hold a model already.
    log: progress output.

  Raises:
    ConversionError, FileNotFoundError: see `read_state_dict`, `config_from_state_dict` and
      `load_state_dict`; or `out` already holds a model (without `overwrite`).
    ValueError, TypeError: a bad `image_size` or `step` (the message names it).
    workdir.CheckpointError: a weight is non-finite after the assignment (nothing written).
  """
  from tf_denseflow import checks, workdir
  from tf_denseflow.model import DenseFlow

  if not overwrite and os.path.exists(os.path.join(out, workdir.CONFIG_FILE)):
    raise ConversionError(f'{out} already holds a model; pass --overwrite or choose another --out.')
  sizes = [image_size] * 2 if np.ndim(image_size) == 0 else list(image_size)
  hw = tuple(checks.check_int('image_size', v, 1, _INT32_MAX) for v in sizes)
  step = checks.check_int('step', 0 if step is None else step, 0, _INT64_MAX)
  state, info = read_state_dict(checkpoint)
  log(
    f'Read {len(state)} arrays from {checkpoint}'
    + (f' (epoch {info["current_epoch"]})' if info else '')
  )
  inferred = config_from_state_dict(state, hw)
  config = inferred
  if preset:
    config = _preset_config(preset, inferred.image_shape)
    _check_preset(config, inferred)
  model = DenseFlow(config)
  assigned = load_state_dict(model, state, strict=strict)
  log(
    f'Mapped {len(assigned)} keys onto {model.num_parameters():,} parameters: '
    f'units {config.units_per_block}, steps {config.steps_per_unit}, widths '
    f'{config.coupling_channels}, growth {config.growth_rate}, image {config.image_shape}'
  )
  # write_model_checkpoint refuses non-finite weights (checked again after the assignment).
  path = workdir.write_model_checkpoint(out, model, step=step)
  log(f'Wrote {path}')
  return path


def define_convert_flags() -> None:
  """Defines this entry point's flags (called only from `run`, never on import)."""
  from absl import flags

  from tf_denseflow import flags as flags_lib

  define = flags_lib.define  # leaves a flag another program defined (tests) as it is
  define(flags.DEFINE_string, 'checkpoint', None, 'Official checkpoint: .pt (needs torch) or .npz.')
  define(flags.DEFINE_string, 'out', None, 'Workdir to write (model_config.json + checkpoints/).')
  define(
    flags.DEFINE_integer,
    'image_size',
    None,
    'Image height = width in pixels (32 or 64 officially).',
    lower_bound=1,
    upper_bound=_INT32_MAX,
  )
  define(flags.DEFINE_enum, 'preset', None, list(_PRESETS), 'Require (and complete) this preset.')
  define(
    flags.DEFINE_integer,
    'step',
    0,
    'Global step recorded in the checkpoint.',
    lower_bound=0,
    upper_bound=_INT64_MAX,
  )
  define(flags.DEFINE_bool, 'strict', True, 'Refuse state_dict keys without a variable here.')
  define(flags.DEFINE_bool, 'overwrite', False, 'Allow --out to hold a model already.')


def main(argv: Sequence[str]) -> None:
  """The `python -m tf_denseflow.convert_torch` entry point (absl).

  Bad input (missing, unreadable or damaged file, a state_dict that does not fit, bad flags)
  ends it with one `error: ...` line on stderr and exit status 2, as every program here.
  """
  from absl import flags, logging

  from tf_denseflow import flags as flags_lib

  logging.set_verbosity(logging.WARNING)
  flags_ = flags.FLAGS
  if len(argv) > 1:
    flags_lib.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  for name in ('checkpoint', 'out', 'image_size'):
    if flags_[name].value is None:
      flags_lib.fail(f'--{name} is required.')
  try:
    convert_checkpoint(
      flags_.checkpoint,
      flags_.out,
      flags_.image_size,
      preset=flags_.preset,
      step=flags_.step,
      strict=flags_.strict,
      overwrite=flags_.overwrite,
    )
  except (ValueError, TypeError, OSError) as e:  # ConversionError, CheckpointError: ValueErrors
    flags_lib.fail(str(e))


def run() -> None:
  """Defines the flags and runs `main` (the `python -m tf_denseflow.convert_torch` entry point)."""
  from absl import app

  from tf_denseflow import flags as flags_lib

  define_convert_flags()
  app.run(main, flags_parser=flags_lib.parse_flags)


if __name__ == '__main__':
  run()
