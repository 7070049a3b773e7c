"""fastai's weight and vocabulary files: read without running their code, written for fastai.

- `read_state_dict(path)`: a `.pth` file as numpy arrays, as fastai's `load_pretrained` and
  `load_encoder` see it: `torch.load(weights_only=True)`, unwrapped from `{'model': ...,
  'opt': ...}` (the optimizer part is skipped), the old `.module.weight_hh_l0` copies
  dropped (fastai's `clean_raw_keys`).
- `read_itos(path)`: a vocabulary (`itos`, a list of tokens) from a pickle, read only after
  an opcode check admits nothing but a list of strings (no import, no call), or from JSON
  (a list, or an object with an `itos` list such as `Vocab.save` writes).
- `write_state_dict(path, state_dict)`, `write_itos(path, itos)` and `write_pretrained(stem,
  state_dict, itos)` (both at once): files that fastai's `torch.load` and `load_pickle`
  read; checked first, written to temporary files, then renamed into place.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import pickletools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from flax_ulmfit.atomic import atomic_write
from flax_ulmfit.interop._checks import as_numpy

# The pickle opcodes of a list of strings (protocols 0-5, memoised or not).
_ITOS_OPCODES = frozenset({
    'PROTO', 'FRAME', 'STOP', 'MARK', 'EMPTY_LIST', 'LIST', 'APPEND', 'APPENDS',
    'UNICODE', 'BINUNICODE', 'SHORT_BINUNICODE', 'BINUNICODE8', 'STRING', 'BINSTRING', 'SHORT_BINSTRING',
    'PUT', 'BINPUT', 'LONG_BINPUT', 'MEMOIZE', 'GET', 'BINGET', 'LONG_BINGET'})


def _torch(where: str):
  try:
    import torch
  except ImportError as err:
    raise ImportError(f"{where}: reading or writing .pth files needs PyTorch; install it with "
                      "pip install 'flax_ulmfit[torch]'") from err
  return torch


class _Skipped:
  """Stands in for fastcore's `L` in fastai's saved optimizer state, which is never used."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state


def _optimizer_state_globals() -> list:
  """What fastai's `{'model', 'opt'}` files hold besides tensors: numpy scalars and dtypes
  (rebuilt from their bytes, as fastai's own `load_model` allows) and fastcore `L`s (skipped)."""
  scalar = (getattr(np, '_core', None) or np.core).multiarray.scalar
  return [scalar, (scalar, 'numpy.core.multiarray.scalar'), np.dtype,
          *(getattr(np.dtypes, name) for name in np.dtypes.__all__), (_Skipped, 'fastcore.foundation.L')]


def clean_raw_keys(state_dict: Mapping) -> dict:
  """Drops `X.module.W` where `X.W_raw` exists (weight-dropped copies that old fastai versions saved)."""
  def without_last_module(key):
    parts = key.split('.')
    if 'module' in parts:
      del parts[len(parts) - 1 - parts[::-1].index('module')]
    return '.'.join(parts)
  return {k: v for k, v in state_dict.items() if f'{without_last_module(k)}_raw' not in state_dict}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The state_dict in the `.pth` file at `path`, as numpy arrays (see the module docstring).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is truncated, not a torch file, holds Python objects that
      `weights_only=True` refuses, or is not a mapping from names to tensors.
  """
  torch, path = _torch('read_state_dict'), Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'read_state_dict: no file at {path}')
  try:
    with torch.serialization.safe_globals(_optimizer_state_globals()):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as err:  # noqa: BLE001 - torch raises many types for bad files; all mean the same here
    raise ValueError(f'read_state_dict: cannot read {path} with torch.load(weights_only=True) '
                     f'({type(err).__name__}: {str(err).splitlines()[0][:300]}); the file is truncated, '
                     'not a PyTorch file, or holds Python objects besides tensors (re-save it with '
                     'torch.save(model.state_dict(), path))') from err
  if isinstance(obj, Mapping) and 'model' in obj:
    obj = obj['model']
  if not isinstance(obj, Mapping) or not obj:
    raise ValueError(f'read_state_dict: {path} holds a {type(obj).__name__}, not a state_dict '
                     '(a non-empty mapping from parameter names to tensors)')
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
  if bad:
    raise ValueError(f'read_state_dict: {path} is not a state_dict: entries {bad[:5]} are not '
                     'named tensors')
  return {k: as_numpy(v, k) for k, v in clean_raw_keys(obj).items()}


class _NoGlobals(pickle.Unpickler):
  """An unpickler that refuses every import and persistent id (belt and braces after the opcode check)."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f'global {module}.{name} refused')

  def persistent_load(self, pid):
    raise pickle.UnpicklingError('persistent ids refused')


def _itos_from_pickle(data: bytes, path: Path) -> list:
  try:
    names = {(op.name, pos) for op, _, pos in pickletools.genops(data)}
  except Exception as err:  # noqa: BLE001 - genops raises ValueError and others on broken input
    raise ValueError(f'read_itos: {path} is not a readable pickle ({err}); it may be truncated') from err
  refused = sorted((pos, name) for name, pos in names if name not in _ITOS_OPCODES)
  if refused:
    pos, name = refused[0]
    raise ValueError(f'read_itos: refusing {path}: it is a pickle that holds more than a list of '
                     f'strings (opcode {name} at byte {pos}), and unpickling it could run code. '
                     'Save the vocabulary as a JSON list of tokens instead')
  try:
    return _NoGlobals(io.BytesIO(data), encoding='utf-8').load()
  except Exception as err:  # noqa: BLE001
    raise ValueError(f'read_itos: {path} is not a readable pickle ({err}); it may be truncated') from err


def read_itos(path: str | os.PathLike) -> list[str]:
  """The vocabulary (a list of tokens, id order) in the pickle or JSON file at `path`.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is truncated or corrupt, is a pickle of anything but a list of
      strings (refused before unpickling), or holds no non-empty list of strings.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'read_itos: no file at {path}')
  data = path.read_bytes()
  if data.removeprefix(b'\xef\xbb\xbf').lstrip()[:1] in (b'[', b'{'):
    try:
      itos = json.loads(data.decode('utf-8-sig'))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
      raise ValueError(f'read_itos: {path} is not readable JSON ({err}); it may be truncated') from err
    if isinstance(itos, dict):
      itos = itos.get('itos')
  else:
    itos = _itos_from_pickle(data, path)
  if not isinstance(itos, list) or not itos or not all(isinstance(t, str) for t in itos):
    raise ValueError(f'read_itos: {path} does not hold a vocabulary: expected a non-empty list of '
                     f'strings (or a JSON object with one under "itos"), got {type(itos).__name__}'
                     + (' with non-string items' if isinstance(itos, list) and itos else ''))
  return itos


def _write_atomically(files: Mapping[Path, bytes]) -> None:
  """Writes every file to a temporary beside it, then renames them all into place
  (`atomic_write`s nested: no rename happens before every file is written)."""
  with contextlib.ExitStack() as stack:
    handles = {path: stack.enter_context(atomic_write(path)) for path in files}
    for path, data in files.items():
      handles[path].write(data)


def _state_dict_bytes(state_dict: Mapping[str, np.ndarray], where: str) -> bytes:
  torch = _torch(where)
  state_dict = {k: as_numpy(v, k) for k, v in state_dict.items()}
  bad = [k for k, v in state_dict.items() if v.dtype.kind == 'f' and not np.isfinite(v).all()]
  if bad:
    raise ValueError(f'{where}: {bad[:5]} hold NaN or infinite values; nothing written (training '
                     'diverged: lower the learning rate or restore a checkpoint)')
  buffer = io.BytesIO()
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, buffer)
  return buffer.getvalue()


def _itos_bytes(itos: Sequence[str], where: str) -> bytes:
  itos = list(itos)
  if not itos or not all(isinstance(t, str) for t in itos):
    raise ValueError(f'{where}: itos must be a non-empty sequence of strings')
  return pickle.dumps(itos, protocol=4)


def write_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> Path:
  """Writes `state_dict` (arrays, key order kept) as a torch `.pth` file; returns the path.
  Non-finite weights (a diverged run) are refused, so they never replace a good file."""
  path = Path(path)
  _write_atomically({path: _state_dict_bytes(state_dict, 'write_state_dict')})
  return path


def write_itos(path: str | os.PathLike, itos: Sequence[str]) -> Path:
  """Writes the vocabulary as a pickled list of strings (what fastai's `load_pickle` reads)."""
  path = Path(path)
  _write_atomically({path: _itos_bytes(itos, 'write_itos')})
  return path


def write_pretrained(stem: str | os.PathLike, state_dict: Mapping[str, np.ndarray],
                     itos: Sequence[str]) -> tuple[Path, Path]:
  """Writes `{stem}.pth` and `{stem}.pkl` together: both are checked before either is written."""
  pth, pkl = Path(f'{stem}.pth'), Path(f'{stem}.pkl')
  _write_atomically({pth: _state_dict_bytes(state_dict, 'write_pretrained'), pkl: _itos_bytes(itos, 'write_pretrained')})
  return pth, pkl
