"""File helpers of the text pipeline: tolerant text decoding and atomic JSON files."""
import json
import os
import warnings
from pathlib import Path

from flax_ulmfit.atomic import atomic_write

_REPLACEMENT = '\ufffd'


def read_text(path: str | os.PathLike, encoding: str = 'utf-8') -> str:
    """The file's text; undecodable bytes become U+FFFD with a warning naming the file and
    how many were replaced (never silently)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'read_text: no file at {path}')
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError:
        text = raw.decode(encoding, errors='replace')
        n_bad = text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode(encoding))
        warnings.warn(f'{path}: {n_bad} undecodable {encoding} byte sequence(s) replaced by '
                      f'U+FFFD; re-encode the file as {encoding} or pass its encoding',
                      stacklevel=2)
        return text


def write_json(path: str | os.PathLike, obj):
    """Writes `obj` as JSON atomically (temporary file in the same folder, then rename)."""
    with atomic_write(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, ensure_ascii=False)


def read_json(path: str | os.PathLike, fmt: str, where: str) -> dict:
    """Reads a JSON object written with `{'format': fmt, ...}`; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{where}: no file at {path}')
    try:
        data = json.loads(path.read_bytes().decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f'{where}: {path} is not readable JSON ({err}); expected a {fmt} file '
                         'written by this library (rewrite it)') from err
    if not isinstance(data, dict) or data.get('format') != fmt:
        found = data.get('format') if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{where}: {path} is not a {fmt} file (found {found!r}); it was '
                         'written by another tool or version: rebuild it with this library')
    return data
