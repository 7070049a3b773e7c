"""Vocab: fastai's make_vocab/Numericalize semantics, JSON round trip, clear load errors."""
import json

import numpy as np
import pytest

from flax_ulmfit.text import Vocab
from flax_ulmfit.text.rules import SPECIAL_TOKENS

SPECIALS = list(SPECIAL_TOKENS)
NAME = 'test-tokenizer'


def test_order_min_freq_and_padding_to_multiple_of_8():
    docs = [['xxbos', 'b', 'a', 'b', 'c'], ['xxbos', 'a', 'b', 'c', 'a', 'rare', 'rare'], ['c']]
    v = Vocab.from_tokens(docs, min_freq=3, tokenizer=NAME)
    # counts: b 3, a 3, c 3 (ties keep first-seen order: b, a, c); rare (2) is dropped;
    # xxbos is moved into the specials block; 9 + 3 = 12 -> padded to 16
    assert v.itos == SPECIALS + ['b', 'a', 'c'] + ['xxfake'] * 4
    assert len(v) == 16


def test_untokenized_text_is_rejected():
    with pytest.raises(TypeError, match=r'document #1 must be token lists .* got a str'):
        Vocab.from_tokens([['xxbos', 'a'], 'xxbos a b'], tokenizer=NAME)
    with pytest.raises(TypeError, match='docs .* got a str'):
        Vocab.from_tokens('xxbos a b', tokenizer=NAME)
    v = Vocab.from_tokens([['a'] * 3], tokenizer=NAME)
    with pytest.raises(TypeError, match='Vocab.numericalize: tokens must be token lists'):
        v.numericalize('a a a')
    with pytest.raises(ValueError, match='max_vocab >= 9'):
        Vocab.from_tokens([['a']], max_vocab=4, tokenizer=NAME)


def test_already_a_multiple_of_8_still_gets_8_fakes_like_fastai():
    v = Vocab.from_tokens([['w'] * 3 + ['x'] * 3 + ['y'] * 3 + ['z'] * 3 + ['q'] * 3 + ['r'] * 3
                           + ['s'] * 3], min_freq=3, tokenizer=NAME)
    assert len(v.itos) == 9 + 7 + 8 and v.itos[-8:] == ['xxfake'] * 8


def test_max_vocab_counts_the_special_tokens():
    docs = [[f'w{i}'] * (100 - i) for i in range(50)]
    v = Vocab.from_tokens(docs, max_vocab=20, min_freq=1, tokenizer=NAME)
    assert v.itos[:20] == SPECIALS + [f'w{i}' for i in range(11)]
    assert v.itos[20:] == ['xxfake'] * 4


def test_numericalize_unknown_is_xxunk_and_textify_inverts():
    v = Vocab.from_tokens([['a', 'b'] * 3], tokenizer=NAME)
    ids = v.numericalize(['xxbos', 'a', 'b', 'unseen', 'xxfake'])
    assert ids.dtype == np.int32
    assert ids.tolist() == [2, 9, 10, 0, 0]   # xxfake is no real token: unknown, as in fastai
    assert v.textify(ids) == ['xxbos', 'a', 'b', 'xxunk', 'xxunk']
    with pytest.raises(ValueError, match=r'ids must lie in \[0, 16\)'):
        v.textify([16])


def test_save_load_round_trip(tmp_path):
    v = Vocab.from_tokens([['é', '😀', 'a'] * 3], tokenizer=NAME)
    v.save(tmp_path / 'vocab.json')
    w = Vocab.load(tmp_path / 'vocab.json', tokenizer=NAME)
    assert w.itos == v.itos and w.tokenizer == NAME
    assert list(tmp_path.iterdir()) == [tmp_path / 'vocab.json']   # no temporary left over


def test_default_tokenizer_name_is_the_default_tokenizers():
    from flax_ulmfit.text import Tokenizer
    assert Vocab.from_tokens([['a']]).tokenizer == Tokenizer(n_workers=1).name


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match='no file at'):
        Vocab.load(tmp_path / 'missing.json')
    (tmp_path / 'bin.json').write_bytes(b'\x80\x04\x95pickle')
    with pytest.raises(ValueError, match='not readable JSON'):
        Vocab.load(tmp_path / 'bin.json')
    (tmp_path / 'list.json').write_text(json.dumps(SPECIALS + ['a']))   # a bare fastai itos
    with pytest.raises(ValueError, match='not a flax_ulmfit.vocab/1 file'):
        Vocab.load(tmp_path / 'list.json')
    Vocab.from_tokens([['a'] * 3], tokenizer='sentencepiece-30k').save(tmp_path / 'sp.json')
    with pytest.raises(ValueError, match="made with tokenizer 'sentencepiece-30k'"):
        Vocab.load(tmp_path / 'sp.json', tokenizer=NAME)


def test_itos_without_special_tokens_first_is_rejected():
    with pytest.raises(ValueError, match='must start with the special tokens'):
        Vocab(['a', 'b'] + SPECIALS, tokenizer=NAME)
