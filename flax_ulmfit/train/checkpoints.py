"""Training checkpoints for exact resume, kept by orbax-checkpoint's `CheckpointManager`.

A checkpoint is a folder named by the global step (`<directory>/<step>/`) with two items:
  - `arrays`: the `TrainState` (params, model state, optimizer and loss-scale state) and,
    mid-epoch, the recurrent state a language model carries between batches;
  - `info` (JSON): where the run stands (epoch, batch, step, finished), the epoch history,
    the per-step log, the metrics of the epoch so far, the run's key, the shapes and dtypes
    of every array, and the caller's `meta` (config, vocabulary, labels, settings).

A run of several `fit`s (fastai's `fine_tune`, ULMFiT's gradual unfreezing) keeps each
stage's checkpoints in `<directory>/<index>-<name>/` (`stage_directory`); `latest_checkpoints`
finds where a run of either kind stands.

orbax writes each checkpoint under a temporary name and renames it when complete, so a
killed save leaves no half checkpoint; its temporary folder is removed by the next save.
Saving is synchronous: the next train step donates the state's buffers.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

FORMAT = 'flax_ulmfit.train_checkpoint/1'


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: damaged, or made by a different run, model or data."""


class Restored(NamedTuple):
  """What `TrainCheckpoints.restore` returns: the arrays onto the templates, and the info."""
  state: Any
  carry: Any
  info: dict


def spec(tree: Any) -> dict[str, list]:
  """`{path: [shape, dtype]}` of every array leaf: what a checkpoint must match to be restored."""
  return {jax.tree_util.keystr(path, simple=True, separator='/'): [list(np.shape(leaf)), str(leaf.dtype)]
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def differences(stored: Any, given: Any, where: str = '') -> list[str]:
  """Readable differences between two JSON-like values (dict keys, list entries, values)."""
  if isinstance(stored, dict) and isinstance(given, dict):
    out = []
    for key in sorted(set(stored) | set(given), key=str):
      name = f'{where}/{key}' if where else str(key)
      if key not in given:
        out.append(f'{name}: only in the checkpoint')
      elif key not in stored:
        out.append(f'{name}: not in the checkpoint')
      else:
        out += differences(stored[key], given[key], name)
    return out
  if isinstance(stored, list) and isinstance(given, list) and stored != given:
    if len(stored) != len(given):
      return [f'{where}: {len(stored)} entries in the checkpoint, {len(given)} now']
    i = next(i for i, (a, b) in enumerate(zip(stored, given)) if a != b)
    n = sum(a != b for a, b in zip(stored, given))
    return [f'{where}: {n} of {len(stored)} entries differ, first #{i}: {stored[i]!r} in the checkpoint, {given[i]!r} now']
  return [] if stored == given else [f'{where}: {stored!r} in the checkpoint, {given!r} now']


class TrainCheckpoints:
  """The checkpoints of one training run in `directory` (created on the first save).

  Args:
    directory: the folder (e.g. `<run>/checkpoints`).
    meta: JSON-serialisable description of the run (config, vocabulary, labels, settings):
      saved with every checkpoint; `restore` refuses a checkpoint whose meta differs.
    keep: how many of the latest checkpoints to keep (older ones are deleted).
  """

  def __init__(self, directory: str | os.PathLike, meta: dict | None = None, keep: int = 2):
    if keep < 1:
      raise ValueError(f'TrainCheckpoints: keep must be >= 1, got {keep=}')
    self.directory, self.meta, self.keep = Path(directory).absolute(), meta or {}, keep
    self._manager = None

  def _open(self, create: bool = False):
    if self._manager is None:
      if not create and not self.directory.is_dir():
        return None
      import orbax.checkpoint as ocp
      self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
          max_to_keep=self.keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=False))
    return self._manager

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None if there is none."""
    manager = self._open()
    return None if manager is None else manager.latest_step()

  def read_info(self, step: int | None = None) -> dict:
    """The JSON info of checkpoint `step` (default: the newest), checked to be ours."""
    import orbax.checkpoint as ocp
    step = self._step(step)
    try:
      info = self._open().restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore())).info
    except Exception as err:
      raise self._damaged(step, err) from err
    if not isinstance(info, dict) or info.get('format') != FORMAT:
      raise CheckpointError(f'TrainCheckpoints: {self.directory / str(step)} is not a {FORMAT} checkpoint '
                            f'(found {info.get("format") if isinstance(info, dict) else type(info).__name__!r})')
    return info

  def check_meta(self, info: dict) -> None:
    """Raises `CheckpointError` unless the checkpoint's run meta equals this run's."""
    diffs = differences(info.get('meta', {}), self.meta)
    if diffs:
      raise CheckpointError(f'TrainCheckpoints: the checkpoint in {self.directory} belongs to a different run: '
                            + '; '.join(diffs[:8]) + '. Resume with the same settings and data, or start a new run')

  def save(self, step: int, state: Any, carry: Any, info: dict) -> None:
    """Saves `state`, `carry` (the recurrent state carried mid-epoch, or None) and `info`
    as checkpoint `step` (replacing one of the same step), then drops all but the newest `keep`."""
    import orbax.checkpoint as ocp
    manager = self._open(create=True)
    if step in manager.all_steps():
      manager.delete(step)
    arrays = {'state': state} if carry is None else {'state': state, 'carry': carry}
    info = dict(info, format=FORMAT, meta=self.meta, spec=spec(arrays))
    manager.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), info=ocp.args.JsonSave(info)))
    manager.wait_until_finished()

  def restore(self, state_like: Any, carry_like: Any = None, step: int | None = None) -> Restored:
    """Restores checkpoint `step` (default: the newest) onto the structure, dtypes and
    shardings of `state_like` (and `carry_like`, which must be given exactly when the
    checkpoint holds a carry), after checking the run meta and every array's shape and dtype."""
    import orbax.checkpoint as ocp
    step = self._step(step)
    info = self.read_info(step)
    self.check_meta(info)
    like = {'state': state_like} if carry_like is None else {'state': state_like, 'carry': carry_like}
    diffs = differences(info['spec'], spec(like))
    if diffs:
      raise CheckpointError(f'TrainCheckpoints: checkpoint {self.directory / str(step)} does not fit this model '
                            'and optimizer (path: [shape, dtype]): ' + '; '.join(diffs[:8]))
    try:
      arrays = self._open().restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(like))).arrays
    except Exception as err:
      raise self._damaged(step, err) from err
    return Restored(arrays['state'], arrays.get('carry'), info)

  def clear(self) -> None:
    """Deletes every checkpoint (and the folder)."""
    if self._manager is not None:
      self._manager.close()
      self._manager = None
    shutil.rmtree(self.directory, ignore_errors=True)

  def _step(self, step: int | None) -> int:
    latest = self.latest_step()
    if latest is None:
      raise CheckpointError(f'TrainCheckpoints: no checkpoint in {self.directory}')
    return latest if step is None else step

  def _damaged(self, step: int, err: Exception) -> CheckpointError:
    older = [s for s in self._open().all_steps() if s < step]
    hint = (f'delete {self.directory / str(step)} to resume from step {max(older)}' if older
            else 'start the run afresh')
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ''
    return CheckpointError(f'TrainCheckpoints: checkpoint {self.directory / str(step)} is damaged or incomplete '
                           f'({type(err).__name__}: {first}); {hint}')


def stage_directory(directory: str | os.PathLike, index: int, name: str) -> Path:
  """The checkpoint folder of stage `index` (0, 1, ...), named `name`, of a run of several
  `fit`s: `<directory>/<index>-<name>`."""
  if index < 0 or not name or os.sep in name:
    raise ValueError(f'stage_directory: need index >= 0 and a name without {os.sep!r}, got {index=}, {name=}')
  return Path(directory) / f'{index}-{name}'


def _stage_index(folder: Path) -> int | None:
  index, dash, _ = folder.name.partition('-')
  return int(index) if dash and index.isdigit() and folder.is_dir() else None


def latest_checkpoints(directory: str | os.PathLike) -> TrainCheckpoints | None:
  """The checkpoints of a run's newest state: its last stage folder holding a checkpoint
  (`stage_directory`), else `directory` itself if it holds one (a run of one `fit`); None if neither does."""
  directory = Path(directory)
  stages = sorted((p for p in directory.glob('*-*') if _stage_index(p) is not None), key=_stage_index)
  for folder in [*reversed(stages), directory]:
    found = TrainCheckpoints(folder)
    if found.latest_step() is not None:
      return found
  return None
