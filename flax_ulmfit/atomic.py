"""Files and folders that are whole or absent: written beside their destination under a
temporary name, flushed to disk, then renamed into place.

A killed writer leaves only its temporary (`.NAME.PID-XXXX.tmp`), never a half-written
file; the next write to the same destination removes temporaries whose process is gone.
`replace_folder` does the same for a folder of files that belong together (weights,
vocabulary, labels, config): a reader sees the old set or the new one, never a mix.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_TMP, _OLD = '.tmp', '.old'


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _leftovers(path: Path, suffix: str) -> list[Path]:
  """Temporaries (`suffix` '.tmp') or replaced folders ('.old') of `path` whose writer is dead."""
  found = []
  for p in path.parent.glob(f'.{glob.escape(path.name)}.*{suffix}'):
    pid = p.name[len(path.name) + 2:-len(suffix)].split('-')[0]
    if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
      found.append(p)
  return found


def _remove(p: Path) -> None:
  if p.is_dir() and not p.is_symlink():
    shutil.rmtree(p, ignore_errors=True)
  else:
    p.unlink(missing_ok=True)


def _sync_dir(folder: Path) -> None:
  """Makes a rename inside `folder` durable (POSIX; a no-op where folders cannot be opened)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _temporary_name(path: Path) -> str:
  return f'.{path.name}.{os.getpid()}-'


def clean_leftovers(path: str | os.PathLike) -> None:
  """Removes temporaries of `path` left by killed writers (done by every write to `path`)."""
  for p in _leftovers(Path(path), _TMP):
    _remove(p)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'wb', encoding: str | None = None) -> Iterator[IO]:
  """Opens a temporary file beside `path` for writing; on success it replaces `path`.

  The file is flushed and fsynced before the rename; on an exception the temporary is
  removed and `path` is untouched.
  """
  if 'w' not in mode:
    raise ValueError(f"atomic_write: mode must be a write mode ('w', 'wb'), got {mode=}")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  clean_leftovers(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_name(path), suffix=_TMP)
  try:
    with os.fdopen(fd, mode, encoding=encoding) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  _sync_dir(path.parent)


def recover_folder(path: str | os.PathLike) -> None:
  """Finishes a `replace_folder` that was killed between its two renames: if `path` is
  missing, its previous version is put back; leftovers of dead writers are removed."""
  path = Path(path)
  olds = sorted(_leftovers(path, _OLD), key=lambda p: p.stat().st_mtime)
  if olds and not path.exists():
    os.replace(olds.pop(), path)
  for p in olds + _leftovers(path, _TMP):
    _remove(p)


@contextlib.contextmanager
def replace_folder(path: str | os.PathLike) -> Iterator[Path]:
  """Yields an empty staging folder beside `path`; when the block ends without an
  exception, the staging folder replaces `path` whole (the old one is removed after).

  A kill at any moment leaves either the old folder or the new one at `path` (between
  the two renames, the old one waits under a hidden name and `recover_folder`, run by the
  next `replace_folder`, puts it back).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  recover_folder(path)
  staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_name(path), suffix=_TMP))
  try:
    yield staging
    for f in staging.rglob('*'):
      if f.is_file():
        with open(f, 'rb') as handle:
          os.fsync(handle.fileno())
    old = None
    if path.exists():
      old = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_name(path), suffix=_OLD))
      os.replace(path, old)
    os.replace(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  _sync_dir(path.parent)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
