"""`Vocab`: fastai v2's vocabulary (`make_vocab` + `Numericalize`), saved as JSON."""
import collections
import os
from typing import Iterable, Sequence

import numpy as np

from flax_ulmfit.text.files import read_json, write_json
from flax_ulmfit.text.rules import SPECIAL_TOKENS

VOCAB_FORMAT = 'flax_ulmfit.vocab/1'
FAKE = 'xxfake'


def _check_token_list(where: str, tokens, what: str):
    """Raises if `tokens` is one string (untokenized text would count characters)."""
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f'{where}: {what} must be token lists (Tokenizer output), got a '
                        f'{type(tokens).__name__} {tokens[:40]!r}: untokenized text would be '
                        'read one character per token; tokenize it first: Tokenizer()(texts)')


class Vocab:
    """Token <-> id mapping: special tokens first (xxunk=0, xxpad=1), then tokens by
    decreasing count (ties: first seen first), padded with `xxfake` to a multiple of 8.

    Unknown tokens map to xxunk (0), as in fastai. `tokenizer` records which tokenizer made
    the tokens (`Tokenizer.name`) so a vocabulary is never used with another one's output.
    """

    def __init__(self, itos: Sequence[str], tokenizer: str):
        itos = list(itos)
        if list(itos[:len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise ValueError(f'Vocab: itos must start with the special tokens {SPECIAL_TOKENS}, '
                             f'got {itos[:len(SPECIAL_TOKENS)]}; build it with Vocab.from_tokens')
        self.itos, self.tokenizer = itos, tokenizer
        self.stoi = {t: i for i, t in enumerate(itos) if t != FAKE}

    @classmethod
    def from_tokens(cls, docs: Iterable[Sequence[str]], max_vocab: int = 60000,
                    min_freq: int = 3, tokenizer: str | None = None) -> 'Vocab':
        """Counts tokens over `docs` (token lists; any iterable, read once) like fastai's
        `make_vocab`. `tokenizer` defaults to the default `Tokenizer().name`."""
        if max_vocab < len(SPECIAL_TOKENS) or min_freq < 0:
            raise ValueError(f'Vocab.from_tokens: need max_vocab >= {len(SPECIAL_TOKENS)} (the '
                             f'special tokens) and min_freq >= 0, got {max_vocab=}, {min_freq=}')
        _check_token_list('Vocab.from_tokens', docs, 'docs (a list of token lists)')
        count = collections.Counter()
        for i, doc in enumerate(docs):
            _check_token_list('Vocab.from_tokens', doc, f'document #{i}')
            count.update(doc)
        itos = [t for t, c in count.most_common(max_vocab) if c >= min_freq]
        specials = set(SPECIAL_TOKENS)
        itos = (list(SPECIAL_TOKENS) + [t for t in itos if t not in specials])[:max_vocab]
        itos += [FAKE] * (8 - len(itos) % 8)   # fastai adds 8 when already a multiple of 8
        if tokenizer is None:
            from flax_ulmfit.text.tokenize import Tokenizer
            tokenizer = Tokenizer(n_workers=1).name
        return cls(itos, tokenizer)

    def __len__(self) -> int:
        return len(self.itos)

    def numericalize(self, tokens: Sequence[str]) -> np.ndarray:
        """Ids (int32) of `tokens`; unknown tokens -> 0 (xxunk)."""
        _check_token_list('Vocab.numericalize', tokens, 'tokens')
        get = self.stoi.get
        return np.fromiter((get(t, 0) for t in tokens), dtype=np.int32, count=len(tokens))

    def textify(self, ids: Iterable[int]) -> list[str]:
        """Tokens of `ids` (the inverse of `numericalize` up to unknown tokens)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.itos)):
            raise ValueError(f'Vocab.textify: ids must lie in [0, {len(self.itos)}), '
                             f'got min {ids.min()} max {ids.max()}')
        return [self.itos[i] for i in ids.tolist()]

    def save(self, path: str | os.PathLike):
        """Writes JSON (atomically: temporary file, then rename)."""
        write_json(path, {'format': VOCAB_FORMAT, 'tokenizer': self.tokenizer, 'itos': self.itos})

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer: str | None = None) -> 'Vocab':
        """Reads a file written by `save`; with `tokenizer` (a `Tokenizer.name`), also checks
        the vocabulary was made from that tokenizer's output."""
        data = read_json(path, VOCAB_FORMAT, 'Vocab.load')
        if tokenizer is not None and data['tokenizer'] != tokenizer:
            raise ValueError(f"Vocab.load: {path} was made with tokenizer {data['tokenizer']!r}, "
                             f'not {tokenizer!r}: its ids would not match these tokens; '
                             "rebuild the vocabulary from this tokenizer's output")
        return cls(data['itos'], data['tokenizer'])
