"""Batching of numericalized documents: fastai's language-model stream and sorted
classifier batches, as numpy int32 arrays with few distinct shapes (for jit)."""
import math
from typing import Iterator, Sequence

import numpy as np

from flax_ulmfit.text.labels import PAD_LABEL


def _check_sizes(where: str, **sizes: int):
    bad = {k: v for k, v in sizes.items() if not isinstance(v, (int, np.integer)) or v < 1}
    if bad:
        raise ValueError(f'{where}: ' + ', '.join(f'{k}={v!r}' for k, v in bad.items())
                         + ' must be a positive integer')


def _check_start(where: str, start: int, n_batches: int):
    if not 0 <= start <= n_batches:
        raise ValueError(f'{where}.batches: start must be in [0, {n_batches}] (batches per '
                         f'epoch), got {start=}')


def check_rows(where: str, rows: slice, bs: int, n_items: int, keeps_short_batch: bool) -> None:
    """Raises unless `rows` selects some of a batch's `bs` rows and, when a loader of `n_items`
    keeps a short last batch unpadded (`keeps_short_batch`), selects them all: a slice of a
    short batch is not this process's share."""
    if not range(bs)[rows]:
        raise ValueError(f'{where}: rows={rows} selects none of the {bs=} rows')
    if rows != slice(None) and keeps_short_batch and n_items % bs:
        raise ValueError(f'{where}: rows={rows} of a short last batch ({n_items % bs} of {bs=}) are not '
                         "this process's share: pass pad_last=True or drop_last=True")


def _check_docs(where: str, docs: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(docs) == 0:
        raise ValueError(f'{where}: got no documents')
    out = []
    for i, d in enumerate(docs):
        d = np.asarray(d)
        if d.ndim != 1 or not np.issubdtype(d.dtype, np.integer):
            raise ValueError(f'{where}: document #{i} must be a 1-D integer array of token ids '
                             f'(Vocab.numericalize), got shape {d.shape} dtype {d.dtype}')
        out.append(d)
    return out


class LMLoader:
    """fastai's `LMDataLoader`: each epoch the documents are shuffled, concatenated and cut
    into `bs` streams read `bptt` tokens at a time; targets are the inputs shifted by one.

    Batch `b` of an epoch is `(x, y)`, int32 arrays of shape (bs, bptt): row i holds tokens
    `[i * bl + b * bptt, ...)` of the epoch's concatenation, `bl = (n_tokens - 1) // bs`, so
    a row continues the same row of the previous batch (carry the LSTM state). Epoch `e`
    depends only on `(seed, e)`. fastai also yields a last, shorter batch; `drop_last=False`
    does the same (one more jit shape).

    Args:
      docs: token-id arrays, one per document.
      bs: number of streams (batch size).
      bptt: sequence length per batch.
      shuffle: shuffle the document order each epoch.
      seed: seeds the shuffles.
      drop_last: drop the last batch when shorter than `bptt`.
      rows: the rows (streams) of every batch to yield, e.g. this process's share of a batch
        split over several processes (`parallel.process_rows(bs, mesh)`); default all `bs`.
    """

    def __init__(self, docs: Sequence[np.ndarray], bs: int = 64, bptt: int = 72,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True, rows: slice = slice(None)):
        _check_sizes('LMLoader', bs=bs, bptt=bptt)
        self.docs = [d.astype(np.int32, copy=False) for d in _check_docs('LMLoader', docs)]
        n_tokens = sum(len(d) for d in self.docs)
        self.bl = (n_tokens - 1) // bs   # tokens per stream; the last target needs one more
        if self.bl < (bptt if drop_last else 1):
            raise ValueError(f'LMLoader: {n_tokens} tokens cannot fill {bs=} streams of '
                             f'{bptt=}: need at least bs * bptt + 1 = {bs * bptt + 1} tokens '
                             '(lower bs or bptt, or pass drop_last=False)')
        self.bs, self.bptt, self.shuffle, self.seed = bs, bptt, shuffle, seed
        self.rows = rows
        if not range(bs)[rows]:
            raise ValueError(f'LMLoader: rows={rows} selects none of the {bs=} streams')
        self.n_batches = self.bl // bptt if drop_last else math.ceil(self.bl / bptt)
        self.epoch = 0

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The next epoch's batches."""
        self.epoch += 1
        return self.batches(self.epoch - 1)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches `start`, `start + 1`, ... of epoch `epoch` (resuming skips the first
        `start` without making them): views into one concatenation, no per-token Python."""
        _check_start('LMLoader', start, self.n_batches)
        order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))
                 if self.shuffle else range(len(self.docs)))
        stream = np.concatenate([self.docs[i] for i in order])
        n = self.bs * self.bl
        xs, ys = stream[:n].reshape(self.bs, self.bl)[self.rows], stream[1:n + 1].reshape(self.bs, self.bl)[self.rows]
        for b in range(start, self.n_batches):
            cols = slice(b * self.bptt, (b + 1) * self.bptt)
            yield xs[:, cols], ys[:, cols]


def sortish_order(lengths: np.ndarray, bs: int, rng: np.random.Generator) -> np.ndarray:
    """fastai's `SortedDL.shuffle_fn`: random order, the longest document first, sorted by
    decreasing length inside chunks of 50 batches, then the batches shuffled except the
    first and the last."""
    idxs = rng.permutation(len(lengths))
    first = np.flatnonzero(idxs == np.argmax(lengths))[0]
    idxs[0], idxs[first] = idxs[first], idxs[0]
    chunk = bs * 50
    idxs = np.concatenate([c[np.argsort(-lengths[c], kind='stable')]
                           for c in np.split(idxs, range(chunk, len(idxs), chunk))])
    batches = np.split(idxs, range(bs, len(idxs), bs))
    if len(batches) <= 2:
        return idxs
    middle = [batches[i] for i in rng.permutation(np.arange(1, len(batches) - 1))]
    return np.concatenate([batches[0], *middle, batches[-1]])


def pad_chunk(doc: np.ndarray, pad_len: int, bptt: int, pad_idx: int = 1) -> np.ndarray:
    """fastai's `pad_chunk` (pad_first=True): whole `bptt` chunks of padding first, then the
    text, then the remaining `(pad_len - len) % bptt` pads, so the text starts on a chunk."""
    n_pad = pad_len - len(doc)
    out = np.full(pad_len, pad_idx, dtype=np.int32)
    start = n_pad // bptt * bptt
    out[start:start + len(doc)] = doc
    return out


class ClasLoader:
    """Classifier batches like fastai's `SortedDL` + `pad_input_chunk`: sortish order when
    shuffling (training), decreasing length otherwise (validation); each batch padded with
    `pad_chunk` to the smallest of `bucket_lens` that holds its longest document.

    Yields `(x, y)`: x int32 (B, L), y int32 (B,). `bucket_lens` defaults to `bptt * 2**k`
    up to the longest document, so jit sees about log2(longest / bptt) shapes.

    Args:
      docs: token-id arrays, one per document.
      labels: class ids, one per document (`CategoryMap.encode`).
      bs: batch size.
      bptt: chunk length of the padding (the classifier reads `bptt` tokens at a time).
      shuffle: sortish batches in a new order each epoch (else sorted, longest first).
      seed: seeds the shuffles (epoch `e` depends only on `(seed, e)`).
      pad_idx: id of xxpad.
      drop_last: drop a last batch smaller than `bs` (default: when shuffling, as fastai).
      bucket_lens: allowed padded lengths, multiples of `bptt`.
      pad_last: pad a kept last short batch to `bs` rows labelled `PAD_LABEL` (each holds
        one token: the first of the batch's first document), which `clas_loss` and its
        metrics skip: one batch size for every device count. For evaluation (in training
        the head's BatchNorm statistics would include them).
      rows: the rows of every batch to yield, e.g. this process's share of a batch split
        over several processes (`parallel.process_rows(bs, mesh)`); default all `bs`. Every
        process pads a batch to the length of its longest document; with a kept last short
        batch, `pad_last` must be set.
    """

    def __init__(self, docs: Sequence[np.ndarray], labels: Sequence[int], bs: int = 64,
                 bptt: int = 72, shuffle: bool = True, seed: int = 0, pad_idx: int = 1,
                 drop_last: bool | None = None, bucket_lens: Sequence[int] | None = None,
                 pad_last: bool = False, rows: slice = slice(None)):
        _check_sizes('ClasLoader', bs=bs, bptt=bptt)
        self.docs = _check_docs('ClasLoader', docs)
        self.labels = np.asarray(labels)
        if self.labels.shape != (len(self.docs),) or not np.issubdtype(self.labels.dtype,
                                                                        np.integer):
            raise ValueError(f'ClasLoader: labels must be {len(self.docs)} integer class ids '
                             f'(CategoryMap.encode), got shape {self.labels.shape} dtype '
                             f'{self.labels.dtype}')
        self.lengths = np.array([len(d) for d in self.docs])
        if self.lengths.min() == 0:
            raise ValueError(f'ClasLoader: document #{int(np.argmin(self.lengths))} is empty; '
                             'tokenized texts always hold xxbos: numericalize the tokens')
        longest = int(self.lengths.max())
        if bucket_lens is None:
            bucket_lens = [bptt * 2 ** k for k in range(max(1, math.ceil(longest / bptt))
                                                        .bit_length() + 1)]
        self.bucket_lens = np.array(sorted(bucket_lens))
        if any(b % bptt for b in self.bucket_lens) or self.bucket_lens[-1] < longest:
            raise ValueError(f'ClasLoader: bucket_lens must be multiples of {bptt=} reaching the '
                             f'longest document ({longest} tokens), got {list(bucket_lens)}')
        self.bs, self.bptt, self.shuffle, self.seed = bs, bptt, shuffle, seed
        self.pad_idx = pad_idx
        self.drop_last = shuffle if drop_last is None else drop_last
        self.pad_last, self.rows = pad_last, rows
        check_rows('ClasLoader', rows, bs, len(self.docs), not (self.drop_last or pad_last))
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.docs)
        return n // self.bs if self.drop_last else math.ceil(n / self.bs)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The next epoch's batches."""
        self.epoch += 1
        return self.batches(self.epoch - 1)

    def order(self, epoch: int) -> np.ndarray:
        """The document indices of epoch `epoch`, in batch order (`bs` per batch)."""
        if self.shuffle:
            return sortish_order(self.lengths, self.bs, np.random.default_rng([self.seed, epoch]))
        return np.argsort(-self.lengths, kind='stable')

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches `start`, `start + 1`, ... of epoch `epoch`."""
        _check_start('ClasLoader', start, len(self))
        order = self.order(epoch)
        for b in range(start, len(self)):
            idx = order[b * self.bs:(b + 1) * self.bs]
            longest = self.lengths[idx].max()
            pad_len = int(self.bucket_lens[np.searchsorted(self.bucket_lens, longest)])
            x = np.stack([pad_chunk(self.docs[i], pad_len, self.bptt, self.pad_idx)
                          for i in idx])
            y = self.labels[idx].astype(np.int32)
            short = self.bs - len(idx)
            if short and self.pad_last:
                filler = pad_chunk(self.docs[idx[0]][:1], pad_len, self.bptt, self.pad_idx)
                x = np.concatenate([x, np.tile(filler, (short, 1))])
                y = np.concatenate([y, np.full(short, PAD_LABEL, np.int32)])
            yield x[self.rows], y[self.rows]
