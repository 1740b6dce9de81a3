"""The `DenseFlowConfig` of an official DenseFlow state_dict, read from its key names and shapes.

`config_from_state_dict` infers every architecture field that some parameter carries; the few
that none does come from the defaults, a preset (`preset_config`, checked by `check_preset`) or
the caller. docs/parity.md lists the fields and the keys each is read from.

Grcic, Grubisic, Segvic. Densely connected normalizing flows. NeurIPS 2021.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np

from tf_denseflow.config import PRESETS, DenseFlowConfig
from tf_denseflow.torch_keys import ConversionError, preview_keys

__all__ = ['PRESETS', 'check_preset', 'config_from_state_dict', 'preset_config']

# Config fields a state_dict cannot tell (no parameters carry them): taken from the defaults, a
# preset or the caller's overrides.
_NOT_INFERABLE = (
  'attention_landmarks',
  'attention_tokens',
  'squeeze_order',
  'coupling_dtype',
  'use_recompute_grad',
)
_ENCODER = 'transforms.0.encoder'  # the variational dequantization flow
# The coupling network of the first Glow step, whose dense layers tell the depth and growth.
_FIRST_NET = 'transforms.3.blocks.0.transforms.0.transforms.2.coupling_net.0.dn.transform.1'


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


def _block_steps(keys: List[str]) -> Tuple[List[Tuple[int, int, int]], List[int]]:
  """`(transform, unit, step)` of every Glow step, and the dense blocks' transform indices."""
  steps = _indices(
    keys, r'transforms\.(\d+)\.blocks\.(\d+)\.transforms\.(\d+)\.transforms\.0\.shift'
  )
  if not steps:
    raise ConversionError(
      'Not a DenseFlow state_dict: no key `transforms.T.blocks.U.transforms.S.transforms.0.shift` '
      f'(first keys: {preview_keys(sorted(keys), 3)}).'
    )
  blocks = sorted({t for t, _, _ in steps})
  if blocks != [3 + 2 * b for b in range(len(blocks))]:
    raise ConversionError(f'Dense blocks at transforms {blocks}, expected 3, 5, 7, ...')
  return steps, blocks


def _infer_blocks(state_dict: Mapping[str, Any], keys: List[str]) -> Dict[str, Any]:
  """Units, steps, widths, growth and cross-unit fields of the dense blocks.

  Also `_squeezed_channels`: the first unit's width, `4 C` for `C`-channel images.
  """
  steps, blocks = _block_steps(keys)
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
  fields: Dict[str, Any] = dict(
    units_per_block=tuple(units),
    steps_per_unit=tuple(steps_per_unit),
    coupling_channels=tuple(widths),
    _squeezed_channels=in_channels[0],
  )
  if growth:
    fields['growth_rate'] = growth.pop()
  if cross_in:
    fields.update(_infer_cross_unit(cross_in))
  return fields


def _infer_cross_unit(cross_in: List[Tuple[int, Any]]) -> Dict[str, Any]:
  """`use_cross_unit_coupling` and `cross_unit_include_previous` from `(channels, g_1 in)`."""
  has_net = {n is not None for _, n in cross_in}
  if len(has_net) > 1:
    raise ConversionError('Some dense blocks have cross-unit networks (noise_params), some not.')
  fields = {'use_cross_unit_coupling': has_net.pop()}
  if fields['use_cross_unit_coupling']:
    # g_1 sees the block input x (official) or [x, y_0] (paper-clean, y_0 as wide as x).
    previous = {n == 2 * c0 for c0, n in cross_in}
    if any(n not in (c0, 2 * c0) for c0, n in cross_in) or len(previous) > 1:
      raise ConversionError(f'Unexpected cross-unit input widths {cross_in} (channels, g_1 in).')
    fields['cross_unit_include_previous'] = previous.pop()
  return fields


def _infer_coupling_network(state_dict: Mapping[str, Any], keys: List[str]) -> Dict[str, Any]:
  """`dense_depth`, `dense_growth` and `use_attention` of the coupling networks."""
  net = _FIRST_NET
  return {
    'dense_depth': _count(keys, re.escape(net) + r'\.dense\.(\d+)\.nn\.0\.weight', 'depth'),
    'dense_growth': _shape(state_dict, f'{net}.dense.0.nn.2.weight')[0],
    'use_attention': f'{net}.mha.qkv.weight' in state_dict,
  }


def _infer_dequantization(state_dict: Mapping[str, Any], keys: List[str]) -> Dict[str, Any]:
  """The dequantization's kind and, for the variational flow, its sizes."""
  enc = _ENCODER
  if not any(k.startswith(enc + '.') for k in keys):
    return {'dequantization': 'uniform'}
  couplings = _indices(keys, re.escape(enc) + r'\.transforms\.(\d+)\.coupling_net\.0\..*')
  cnet = f'{enc}.transforms.1.coupling_net.0.transform'
  ctx = f'{enc}.context_init'
  return {
    'dequantization': 'variational',
    'dequant_steps': len(couplings),
    'dequant_mid_channels': _shape(state_dict, f'{cnet}.0.weight')[0],
    'dequant_depth': _count(
      keys, re.escape(cnet) + r'\.1\.dense\.(\d+)\.nn\.0\.weight', 'dequant_depth'
    ),
    'dequant_growth': _shape(state_dict, f'{cnet}.1.dense.0.nn.2.weight')[0],
    'dequant_context_channels': _shape(state_dict, f'{ctx}.2.weight')[0],
    'dequant_context_depth': _count(
      keys, re.escape(ctx) + r'\.1\.(\d+)\.nn\.0\.weight', 'dequant_context_depth'
    ),
    'dequant_context_growth': _shape(state_dict, f'{ctx}.1.0.nn.2.weight')[0],
  }


def _infer_num_bits(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """`num_bits` from the uniform dequantization's log-det per dimension, `-num_bits ln 2`."""
  if 'transforms.0.ldj_per_dim' not in state_dict:
    return {}
  # Glow's n_bits_x.
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
  return {'num_bits': int(round(bits))}


def _infer_fields(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """The config fields that the key names and shapes determine (and `_squeezed_channels`)."""
  keys = list(state_dict)
  fields = _infer_blocks(state_dict, keys)
  fields.update(_infer_coupling_network(state_dict, keys))
  fields.update(_infer_dequantization(state_dict, keys))
  fields.update(_infer_num_bits(state_dict))
  return fields


def config_from_state_dict(
  state_dict: Mapping[str, Any], image_shape: Sequence[int], **overrides
) -> DenseFlowConfig:
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


def preset_config(preset: str, image_shape: Tuple[int, int, int]) -> DenseFlowConfig:
  """The `DenseFlowConfig` preset `preset` (one of `PRESETS`) at `image_shape`.

  Raises:
    ConversionError: an unknown preset, or one that does not fit `image_shape`.
  """
  if preset not in PRESETS:
    raise ConversionError(f'Unknown preset {preset!r}; choose one of {", ".join(PRESETS)}.')
  try:
    return getattr(DenseFlowConfig, preset)(image_shape)
  except ValueError as e:
    raise ConversionError(f'Preset {preset} at image shape {image_shape}: {e}') from None


def check_preset(config: DenseFlowConfig, inferred: DenseFlowConfig) -> None:
  """Checks that a checkpoint's `inferred` config is the preset `config` where a key tells.

  Raises:
    ConversionError: naming every inferable field where the two differ.
  """
  diffs = [
    f'{f.name}={getattr(inferred, f.name)!r} (preset: {getattr(config, f.name)!r})'
    for f in dataclasses.fields(config)
    if f.name not in _NOT_INFERABLE and getattr(config, f.name) != getattr(inferred, f.name)
  ]
  if diffs:
    raise ConversionError('The checkpoint is not the preset: ' + ', '.join(diffs) + '.')
