"""Optional PNG plots: matplotlib if installed (a note otherwise), files written atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def figure(path: str | os.PathLike, ncols: int, who: str):
  """`(fig, axes)` with `ncols` panels in a row, or None (after printing a note) without matplotlib."""
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    print(f'{who}: matplotlib is not installed, no plot written to {path} (pip install matplotlib)')
    return None
  fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 3.5), squeeze=False)
  return fig, axes[0]


def save(fig, path: str | os.PathLike) -> None:
  """Writes `fig` to `path` via a temporary file and a rename, then closes it."""
  import matplotlib.pyplot as plt
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.stem}.', suffix=path.suffix or '.png')
  os.close(fd)
  try:
    fig.savefig(tmp)
    os.replace(tmp, path)
  finally:
    Path(tmp).unlink(missing_ok=True)
    plt.close(fig)
