"""`CategoryMap`: class labels <-> ids (fastai's sorted `CategoryMap`), saved as JSON."""
import os
from typing import Iterable, Sequence

import numpy as np

from flax_ulmfit.text.files import read_json, write_json

LABELS_FORMAT = 'flax_ulmfit.labels/1'
PAD_LABEL = -1  # label of the rows that pad a short last batch; losses and metrics skip them


def _check_not_one_string(where: str, labels):
    if isinstance(labels, (str, bytes)):
        raise TypeError(f'{where}: labels must be a list of labels, got one '
                        f'{type(labels).__name__} {labels[:40]!r} (it would be read one character '
                        'per label); wrap it in a list')


class CategoryMap:
    """Label strings in sorted order (fastai's default); a label's id is its position."""

    def __init__(self, classes: Sequence[str]):
        self.classes = [str(c) for c in classes]
        self.index = {c: i for i, c in enumerate(self.classes)}
        if len(self.index) != len(self.classes):
            raise ValueError(f'CategoryMap: classes must be distinct, got {self.classes}')

    @classmethod
    def from_labels(cls, labels: Iterable) -> 'CategoryMap':
        """The sorted distinct labels (as strings) of the training set."""
        _check_not_one_string('CategoryMap.from_labels', labels)
        return cls(sorted({str(label) for label in labels}))

    def __len__(self) -> int:
        return len(self.classes)

    def encode(self, labels: Iterable, where: str = 'labels') -> np.ndarray:
        """Ids (int32); a label not seen in training raises, naming it and `where`."""
        _check_not_one_string('CategoryMap.encode', labels)
        labels = [str(label) for label in labels]
        unknown = sorted(set(labels).difference(self.index))
        if unknown:
            raise ValueError(f'CategoryMap.encode: {where} hold labels absent from training '
                             f'{unknown[:10]}; known classes: {self.classes}. Fix the labels '
                             'or build the map from data that contains every class')
        return np.array([self.index[label] for label in labels], dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Labels of `ids` (integers in [0, len(self)))."""
        ids = np.asarray(ids)
        if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0
                         or ids.max() >= len(self.classes)):
            raise ValueError(f'CategoryMap.decode: ids must be integers in [0, '
                             f'{len(self.classes)}) for classes {self.classes}, got '
                             f'{ids.ravel()[:10].tolist()} (dtype {ids.dtype})')
        return [self.classes[i] for i in ids.reshape(-1).tolist()]

    def save(self, path: str | os.PathLike):
        """Writes JSON (atomically: temporary file, then rename)."""
        write_json(path, {'format': LABELS_FORMAT, 'classes': self.classes})

    @classmethod
    def load(cls, path: str | os.PathLike) -> 'CategoryMap':
        """Reads a file written by `save`."""
        return cls(read_json(path, LABELS_FORMAT, 'CategoryMap.load')['classes'])
