"""The official DenseFlow state_dict keys, mapped onto this package's variables.

github.com/matejgrcic/DenseFlow names every tensor by its module path (`transforms.3.blocks.0.
transforms.0.transforms.2.coupling_net.0.dn.transform.0.weight`); `official_key_map` lists, for a
`DenseFlow`, the variable each key carries and the layout change on the way:
```
conv kernels       NCHW (out, in, kh, kw) -> (kh, kw, in, out)
1x1-conv matrices  as they are (z = x @ W^T here, F.conv2d(x, W[:, :, None, None]) there)
ActNorm, base      (1, C, 1, 1) -> (C,)
BatchNorm          weight, bias, running_mean, running_var -> gamma, beta, moving_mean,
                   moving_variance
```
Buffers that carry no state here (`initialized`, `ldj_per_dim`, the shift bijection's constants,
the sigmoid temperature, `num_batches_tracked`, transition dist buffers) are checked for their
expected values and otherwise skipped. docs/parity.md lists every special case.

Grcic, Grubisic, Segvic. Densely connected normalizing flows. NeurIPS 2021.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Tuple

import numpy as np

__all__ = ['ConversionError', 'KeyMap', 'load_state_dict', 'official_key_map', 'preview_keys']


class ConversionError(ValueError):
  """A state_dict does not match the model: missing, unexpected or mis-shaped keys."""


def preview_keys(keys: Iterable[str], n: int = 5) -> str:
  """The first `n` keys, comma-separated, and how many more there are (for error messages)."""
  keys = list(keys)
  more = f' (and {len(keys) - n} more)' if len(keys) > n else ''
  return ', '.join(keys[:n]) + more


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


def _dequantizer_keys(deq, out: KeyMap) -> None:
  """The variational dequantization flow (`transforms.0.encoder`)."""
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


def official_key_map(model) -> KeyMap:
  """Every official state_dict key that carries state, mapped to a variable of `model`.

  Args:
    model: a `DenseFlow`.

  Returns:
    official key -> `(variable, transform)`: `transform(official array)` has the variable's shape.
  """
  out: KeyMap = {}
  flow = model.bijector
  out['base_dist.loc'] = (flow.base.shift, _vec)
  out['base_dist.log_scale'] = (flow.base.log_scale, _vec)
  if hasattr(model.dequantizer, 'context_net'):
    _dequantizer_keys(model.dequantizer, out)
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


def _as_float32(value: np.ndarray) -> np.ndarray:
  with np.errstate(over='ignore', invalid='ignore'):  # overflow to Inf is what is checked
    return value.astype(np.float32)


def _key_problems(key_map: KeyMap, state_dict: Dict[str, np.ndarray], strict: bool) -> List[str]:
  """Every missing, unexpected (with `strict`), mis-shaped, non-numeric or non-finite key."""
  missing = sorted(set(key_map) - set(state_dict))
  unexpected = sorted(k for k in state_dict if k not in key_map and not _stateless_buffer(k))
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing key(s): {preview_keys(missing)}')
  if unexpected and strict:
    problems.append(f'{len(unexpected)} unexpected key(s): {preview_keys(unexpected)}')
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
  return problems


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
  problems = _key_problems(key_map, state_dict, strict)
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
