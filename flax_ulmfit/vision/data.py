"""Image batches on the host: normalisation with the training set's statistics, fastai-style
light augmentation (random crop with padding, optional flips), seeded shuffles, NHWC numpy."""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from flax_ulmfit.text.data import check_rows
from flax_ulmfit.text.labels import PAD_LABEL
from flax_ulmfit.vision.datasets import ImageSet

PAD_MODES = ('constant', 'reflect', 'edge')


class Stats(NamedTuple):
  """Per-channel statistics for `(x - mean) / std` (fastai's `Normalize`)."""
  mean: np.ndarray  # shape=(C,), dtype=float32
  std: np.ndarray   # shape=(C,), dtype=float32


def channel_stats(images: np.ndarray) -> Stats:
  """Mean and standard deviation of each channel of (N, H, W, C) `images` (computed in float64)."""
  images = np.asarray(images)
  mean = images.mean(axis=(0, 1, 2), dtype=np.float64)
  std = images.std(axis=(0, 1, 2), dtype=np.float64)
  if not np.all(np.isfinite(mean)) or not np.all(std > 0):
    raise ValueError(f'channel_stats: channels need finite values and a nonzero spread to normalise, got '
                     f'mean {mean.tolist()} std {std.tolist()}')
  return Stats(mean.astype(np.float32), std.astype(np.float32))


def random_crop(images: np.ndarray, pad: int, rng: np.random.Generator, mode: str = 'constant') -> np.ndarray:
  """Pads (N, H, W, C) `images` by `pad` pixels and cuts an H x W window at a random offset per image.

  `mode` is numpy's pad mode: 'constant' pads with zeros (black, before normalisation),
  'reflect' mirrors the border (fastai v1's `rand_pad`), 'edge' repeats it.
  """
  if pad == 0:
    return images
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
  windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))  # (N, 2p+1, 2p+1, C, H, W)
  dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
  return windows[np.arange(n), dy, dx].transpose(0, 2, 3, 1)


class ImageLoader:
  """Batches `(x, y)` of an `ImageSet`: x float32 (bs, H, W, C) normalised, y int32 (bs,).

  Each epoch the images are shuffled (when `shuffle`) and augmented from one generator
  seeded with `(seed, epoch)`, so epoch `e` is the same wherever it is replayed (a resumed
  run draws what the uninterrupted one drew). A last batch shorter than `bs` is dropped
  (`drop_last`, fastai's default for training) or padded up to `bs` with zero images
  labelled `PAD_LABEL` (`pad_last`; one shape for jit and for every device count), which
  the vision loss and metrics skip; with `pad_last=False` it comes short.

  Args:
    data: the images and labels.
    bs: batch size.
    shuffle: a new order each epoch.
    seed: seeds the order and the augmentation.
    drop_last: drop a last short batch (default: when shuffling).
    pad_last: pad a kept last short batch to `bs` rows.
    stats: normalisation statistics; None computes this set's own (give a validation
      loader the training loader's `stats`).
    crop_pad: random crop with this much padding (0: no cropping).
    pad_mode: how the crop's padding is filled, 'constant' (zeros), 'reflect' or 'edge'.
    flip: random horizontal flips (p 0.5); off for digits, whose mirror images are not digits.
    rows: the rows of every batch to yield, e.g. this process's share of a batch split over
      several processes (`parallel.process_rows(bs, mesh)`); default all `bs`. Each process
      draws the whole batch's augmentation, so the rows are those one process would give.
  """

  def __init__(self, data: ImageSet, bs: int = 64, *, shuffle: bool = True, seed: int = 0,
               drop_last: bool | None = None, pad_last: bool = True, stats: Stats | None = None,
               crop_pad: int = 0, pad_mode: str = 'constant', flip: bool = False, rows: slice = slice(None)):
    images, labels = np.asarray(data.images), np.asarray(data.labels)
    if images.ndim != 4 or images.dtype != np.float32:
      raise ValueError(f'ImageLoader: images must be float32 (N, H, W, C), got shape {images.shape} dtype '
                       f'{images.dtype}')
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'ImageLoader: labels must be {images.shape[0]} integer class ids, got shape '
                       f'{labels.shape} dtype {labels.dtype}')
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= len(data.classes):
      raise ValueError(f'ImageLoader: labels must lie in [0, {len(data.classes)}) for classes {data.classes}, '
                       f'got {"none" if len(labels) == 0 else f"[{labels.min()}, {labels.max()}]"}')
    if bs < 1:
      raise ValueError(f'ImageLoader: bs must be >= 1, got {bs=}')
    if crop_pad < 0 or pad_mode not in PAD_MODES:
      raise ValueError(f'ImageLoader: crop_pad must be >= 0 and pad_mode one of {PAD_MODES}, got '
                       f'{crop_pad=} {pad_mode=}')
    self.drop_last = shuffle if drop_last is None else drop_last
    if self.drop_last and len(labels) < bs:
      raise ValueError(f'ImageLoader: {len(labels)} images make no full batch of {bs=} and drop_last is on; '
                       'lower bs or pass drop_last=False')
    self.stats = channel_stats(images) if stats is None else Stats(*map(lambda a: np.asarray(a, np.float32), stats))
    if self.stats.mean.shape != images.shape[-1:]:
      raise ValueError(f'ImageLoader: stats are for {self.stats.mean.shape[0]} channels, images have '
                       f'{images.shape[-1]}')
    self.images, self.labels, self.classes = images, labels.astype(np.int32), list(data.classes)
    self.bs, self.shuffle, self.seed, self.pad_last = bs, shuffle, seed, pad_last
    self.crop_pad, self.pad_mode, self.flip = crop_pad, pad_mode, flip
    self.rows = rows
    check_rows('ImageLoader', rows, bs, len(labels), not (self.drop_last or pad_last))
    self.epoch = 0

  def __len__(self) -> int:
    n = len(self.labels)
    return n // self.bs if self.drop_last else math.ceil(n / self.bs)

  @property
  def n_images(self) -> int:
    """Images yielded per epoch (padding rows not counted)."""
    return len(self) * self.bs if self.drop_last else len(self.labels)

  def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The next epoch's batches."""
    self.epoch += 1
    return self.batches(self.epoch - 1)

  def batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of epoch `epoch`."""
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(len(self.labels)) if self.shuffle else np.arange(len(self.labels))
    for b in range(len(self)):
      idx = order[b * self.bs:(b + 1) * self.bs]
      x = random_crop(self.images[idx], self.crop_pad, rng, self.pad_mode)
      if self.flip:
        x = np.where((rng.random(len(idx)) < 0.5)[:, None, None, None], x[:, :, ::-1], x)
      x = (x - self.stats.mean) / self.stats.std
      y = self.labels[idx]
      short = self.bs - len(idx)
      if short and self.pad_last:
        x = np.concatenate([x, np.zeros((short, *x.shape[1:]), np.float32)])
        y = np.concatenate([y, np.full(short, PAD_LABEL, np.int32)])
      yield x[self.rows].astype(np.float32, copy=False), y[self.rows]
