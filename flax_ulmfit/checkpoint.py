"""Checkpoints: any pytree of arrays as a NumPy .npz (one entry per key path) plus JSON metadata.

Written atomically (`atomic.atomic_write`: a temporary file, then a rename), read without
unpickling, and validated against a template pytree: every missing, unexpected or
mis-shaped entry is named.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_ulmfit.atomic import atomic_write

_META = '__metadata__'


def _entries(tree: Any) -> dict[str, Any]:
  """Leaves by '/'-joined path (a flat state_dict keeps its own key names)."""
  entries = {jax.tree_util.keystr(path, simple=True, separator='/'): leaf
             for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  if _META in entries:
    raise ValueError(f'checkpoint: {_META!r} is reserved for the metadata; rename that entry')
  return entries


def save(path: str | os.PathLike, tree: Any, metadata: dict | None = None) -> None:
  """Saves the array leaves of `tree` and JSON-serialisable `metadata` to `path` (.npz), atomically."""
  path = Path(path)
  arrays, kinds = {}, {}
  for key, leaf in _entries(tree).items():
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      kinds[key] = {'prng_impl': str(jax.random.key_impl(leaf))}
      leaf = jax.random.key_data(leaf)
    value = np.asarray(leaf)
    if value.dtype.kind not in 'biufc':  # e.g. bfloat16: store the bits, remember the dtype
      kinds[key] = {'dtype': str(value.dtype)}
      value = value.view(f'uint{value.dtype.itemsize * 8}')
    arrays[key] = value
  meta = json.dumps({'user': metadata or {}, 'kinds': kinds})
  with atomic_write(path) as f:
    np.savez(f, **arrays, **{_META: np.array(meta)})


def _read(path: str | os.PathLike, who: str) -> tuple[dict[str, np.ndarray], dict]:
  """The arrays and the metadata record of the checkpoint at `path`, validated as a file."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'checkpoint.{who}: no checkpoint at {str(path)!r}; check the path '
                            '(checkpoint.save writes .npz files)')
  try:
    with np.load(path, allow_pickle=False) as npz:
      stored = {k: npz[k] for k in npz.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
    raise ValueError(f'checkpoint.{who}: {str(path)!r} is not a readable checkpoint ({err}); '
                     'it may be truncated or not written by checkpoint.save: re-save it') from err
  if _META not in stored:
    raise ValueError(f'checkpoint.{who}: {str(path)!r} has no {_META!r} entry; it was not written by checkpoint.save')
  return stored, json.loads(str(stored.pop(_META)))


def metadata(path: str | os.PathLike) -> dict:
  """The `metadata` a checkpoint was saved with (e.g. to build the model before `load`)."""
  return _read(path, 'metadata')[1]['user']


class StructureMismatch(KeyError, ValueError):
  """A checkpoint whose entries are not the target's: a KeyError (what is missing) and a
  ValueError (bad input a script reports in one line, as it does a wrong shape)."""

  def __str__(self) -> str:
    return str(self.args[0])


def load(path: str | os.PathLike, like: Any, allow_nonfinite: bool = False) -> tuple[Any, dict]:
  """Loads a checkpoint into the structure of `like`; returns `(tree, metadata)`.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the file is not a readable checkpoint, an entry's shape or dtype differs
      from `like`'s, or (unless `allow_nonfinite`) a floating entry holds inf/NaN.
    StructureMismatch (a KeyError and a ValueError): entries are missing or unexpected (all
      of them named).
  """
  path = Path(path)
  stored, meta = _read(path, 'load')
  template = _entries(like)
  missing, extra = sorted(set(template) - set(stored)), sorted(set(stored) - set(template))
  if missing or extra:
    raise StructureMismatch(f'checkpoint.load: {str(path)!r} does not match the target structure: '
                   f'missing entries {missing}, unexpected entries {extra}')
  leaves = []
  for key, target in template.items():
    value, kind = stored[key], meta['kinds'].get(key, {})
    if 'dtype' in kind:
      value = value.view(jnp.dtype(kind['dtype']))
    if 'prng_impl' in kind:
      value = jax.random.wrap_key_data(value, impl=kind['prng_impl'])
    want_shape = tuple(np.shape(target))
    want_dtype = target.dtype if hasattr(target, 'dtype') else np.asarray(target).dtype
    if tuple(value.shape) != want_shape or value.dtype != want_dtype:
      raise ValueError(f'checkpoint.load: entry {key} in {str(path)!r} has shape {tuple(value.shape)} '
                       f'dtype {value.dtype}; the target expects shape {want_shape} dtype {want_dtype}')
    if not allow_nonfinite and jnp.issubdtype(value.dtype, jnp.inexact) and not np.all(np.isfinite(np.asarray(value, np.float32))):
      raise ValueError(f'checkpoint.load: entry {key} in {str(path)!r} holds inf/NaN; the run that saved '
                       'it diverged; load an earlier checkpoint or pass allow_nonfinite=True')
    leaves.append(jnp.asarray(value))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves), meta['user']
