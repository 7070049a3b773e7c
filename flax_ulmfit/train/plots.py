"""Optional PNG plots: matplotlib if installed (a note otherwise), files written atomically."""
from __future__ import annotations

import os
from pathlib import Path

from flax_ulmfit.atomic import atomic_write


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
  fig.tight_layout()
  try:
    with atomic_write(path) as f:
      fig.savefig(f, format=Path(path).suffix.lstrip('.') or 'png')
  finally:
    plt.close(fig)
