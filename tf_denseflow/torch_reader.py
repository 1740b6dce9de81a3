"""Reading an official DenseFlow state_dict from a PyTorch checkpoint or an `.npz`.

`.pt` files go through `torch.load(..., weights_only=True)` (torch imported only then, never
arbitrary pickles); `.npz` files through `np.load` without pickles. Either way the result is a
state_dict of numpy arrays, official key -> array, for `torch_config` and `torch_keys`.

Grcic, Grubisic, Segvic. Densely connected normalizing flows. NeurIPS 2021.
"""

from __future__ import annotations

import collections
import os
import re
import zipfile
import zlib
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from tf_denseflow.torch_keys import ConversionError, preview_keys

__all__ = ['TORCH_SUFFIXES', 'read_state_dict']

TORCH_SUFFIXES = ('.pt', '.pth', '.tar', '.ckpt', '.bin')


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
      f'{path}: not a state_dict (entries that are not named arrays: '
      f'{preview_keys(map(str, bad), 3)}).'
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


def _read_npz(path: str) -> Dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      names = list(data.files)
      if any(n.startswith('param/') for n in names):
        return {n[len('param/') :]: data[n] for n in names if n.startswith('param/')}
      return {n: data[n] for n in names}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise ConversionError(f'{path}: not a readable .npz ({e}).') from None


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
    obj = _read_npz(path)
  elif suffix in TORCH_SUFFIXES:
    obj = _read_torch(path)
  else:
    raise ConversionError(
      f'{path}: unknown checkpoint type {suffix!r} (expected .npz or {", ".join(TORCH_SUFFIXES)}).'
    )
  state, info = _unwrap(obj, path)
  return collections.OrderedDict((k, _to_numpy(v)) for k, v in state.items()), info
