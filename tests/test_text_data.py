"""LM and classifier loaders against fastai's batching rules, written out independently."""
import numpy as np
import pytest

from flax_ulmfit.text.data import ClasLoader, LMLoader, pad_chunk, sortish_order
from flax_ulmfit.text.labels import PAD_LABEL, CategoryMap


def _docs(lengths, start=0):
    out, nxt = [], start
    for n in lengths:
        out.append(np.arange(nxt, nxt + n))
        nxt += n
    return out


def _fastai_lm_items(stream, bs, seq_len):
    """fastai LMDataLoader.create_item, one sample at a time (reference for the views)."""
    corpus = (len(stream) - 1) // bs * bs
    bl = corpus // bs
    n_batches = bl // seq_len + int(bl % seq_len != 0)
    last_len = bl - (n_batches - 1) * seq_len
    batches = []
    for b in range(n_batches):
        xs, ys = [], []
        for i in range(bs):
            seq = b * bs + i
            sl = last_len if seq // bs == n_batches - 1 else seq_len
            st = (seq % bs) * bl + (seq // bs) * seq_len
            txt = stream[st:st + sl + 1]
            xs.append(txt[:-1])
            ys.append(txt[1:])
        batches.append((np.stack(xs), np.stack(ys)))
    return batches


def test_lm_batches_equal_fastai_create_item_without_shuffle():
    docs = _docs([50, 7, 130, 33, 1, 90])
    lm = LMLoader(docs, bs=4, bptt=10, shuffle=False, drop_last=False)
    expected = _fastai_lm_items(np.concatenate(docs), 4, 10)
    got = list(lm)
    assert len(lm) == len(got) == len(expected) == 8   # bl = 310 // 4 = 77 -> 7 full + 7
    for (x, y), (ex, ey) in zip(got, expected):
        assert x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)


def test_lm_drop_last_keeps_one_shape_and_streams_continue():
    lm = LMLoader(_docs([311]), bs=4, bptt=10, shuffle=False)
    batches = list(lm)
    assert len(lm) == len(batches) == 7
    assert {x.shape for x, _ in batches} == {(4, 10)}
    # row i of batch b+1 continues row i of batch b (the carried LSTM state is valid)
    np.testing.assert_array_equal(batches[1][0][:, 0], batches[0][0][:, -1] + 1)
    np.testing.assert_array_equal(batches[0][1], batches[0][0] + 1)


def test_lm_shuffle_is_per_epoch_and_seeded():
    docs = _docs([20] * 30)
    a, b = LMLoader(docs, bs=3, bptt=8, seed=1), LMLoader(docs, bs=3, bptt=8, seed=1)
    epoch0 = [x for x, _ in a]
    epoch1 = [x for x, _ in a]
    assert all((p == q).all() for p, q in zip(epoch0, [x for x, _ in b]))
    assert not all((p == q).all() for p, q in zip(epoch0, epoch1))
    assert all((p == q).all() for p, q in zip(epoch1, [x for x, _ in b.batches(1)]))
    # a shuffle moves whole documents: each one still appears as a contiguous run
    stream = np.concatenate([x for x, _ in LMLoader(docs, bs=1, bptt=599, seed=1)])[0]
    assert sorted(stream[::20].tolist()) == list(range(0, 600, 20))
    assert all((stream[k:k + 20] == stream[k] + np.arange(20)).all()
               for k in range(0, 580, 20))


def test_lm_rows_are_one_process_share_of_every_batch():
    docs = _docs([20] * 30)
    whole = list(LMLoader(docs, bs=4, bptt=8, seed=1).batches(2))
    halves = [list(LMLoader(docs, bs=4, bptt=8, seed=1, rows=slice(i, i + 2)).batches(2)) for i in (0, 2)]
    assert len(whole) == len(halves[0]) == len(halves[1]) > 1
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves):
        assert (np.concatenate([x0, x1]) == x).all() and (np.concatenate([y0, y1]) == y).all()
    with pytest.raises(ValueError, match='selects none of the bs=4 streams'):
        LMLoader(docs, bs=4, bptt=8, rows=slice(4, 6))


def test_lm_errors_are_clear():
    with pytest.raises(ValueError, match=r'need at least bs \* bptt \+ 1 = 41 tokens'):
        LMLoader(_docs([30]), bs=4, bptt=10)
    with pytest.raises(ValueError, match=r'document #1 must be a 1-D integer array'):
        LMLoader([np.arange(5), np.ones(5)], bs=1, bptt=2)
    with pytest.raises(ValueError, match='got no documents'):
        LMLoader([], bs=1, bptt=2)
    for bad in (dict(bs=0), dict(bptt=0), dict(bs=-2)):
        with pytest.raises(ValueError, match=r'must be a positive integer'):
            LMLoader(_docs([100]), **dict(dict(bs=2, bptt=5), **bad))


def test_lm_batches_resume_at_a_position_without_the_earlier_ones():
    dl = LMLoader(_docs([40, 70, 55]), bs=3, bptt=7, seed=3)
    full = list(dl.batches(2))
    tail = list(dl.batches(2, start=3))
    assert len(tail) == len(full) - 3
    for (x, y), (xf, yf) in zip(tail, full[3:]):
        np.testing.assert_array_equal(x, xf)
        np.testing.assert_array_equal(y, yf)
    assert list(dl.batches(2, start=len(dl))) == []
    with pytest.raises(ValueError, match='start must be in'):
        next(dl.batches(0, start=len(dl) + 1))


def test_pad_chunk_matches_fastai_layout():
    # fastai pad_chunk(pad_first=True): (l // seq_len) * seq_len pads, text, l % seq_len pads
    out = pad_chunk(np.array([7, 8, 9]), pad_len=12, bptt=4)
    assert out.tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 7, 8, 9, 1]
    assert pad_chunk(np.array([5, 6]), pad_len=4, bptt=4, pad_idx=0).tolist() == [5, 6, 0, 0]


def test_sortish_order_follows_fastai():
    lengths = np.random.default_rng(0).integers(1, 500, size=1000)
    order = sortish_order(lengths, bs=4, rng=np.random.default_rng(3))
    assert sorted(order.tolist()) == list(range(1000))
    assert lengths[order[0]] == lengths.max()   # the longest batch first
    # every batch comes from one chunk sorted by decreasing length: sorted inside itself
    batches = order.reshape(-1, 4)
    assert all((np.diff(lengths[b]) <= 0).all() for b in batches)
    assert not (np.diff(lengths[order]) <= 0).all()   # but not globally sorted


def test_clas_loader_validation_sorted_and_bucketed():
    docs = _docs([5, 80, 3, 150, 70])
    cl = ClasLoader(docs, labels=[0, 1, 0, 1, 2], bs=2, bptt=72, shuffle=False)
    batches = list(cl)
    assert len(cl) == 3 and not cl.drop_last
    assert [x.shape for x, _ in batches] == [(2, 288), (2, 72), (1, 72)]   # 150 -> 288
    assert [y.tolist() for _, y in batches] == [[1, 1], [2, 0], [0]]
    x0 = batches[0][0]
    # 150 tokens in 288: 138 pads = one whole chunk of 72 first, the text, then 66
    assert (x0[0, :72] == 1).all() and (x0[0, 222:] == 1).all()
    np.testing.assert_array_equal(x0[0, 72:222], docs[3])
    np.testing.assert_array_equal(x0[1, 144:224], docs[1])   # 208 pads = 2 chunks + 64


def test_clas_loader_training_epochs_cover_every_document_once():
    docs = _docs(np.random.default_rng(1).integers(1, 300, size=37))
    cl = ClasLoader(docs, labels=np.arange(37), bs=8, bptt=72, seed=0)   # label = doc index
    assert len(cl) == 4 and cl.drop_last   # fastai drops the incomplete training batch
    epoch0 = np.concatenate([y for _, y in cl])
    epoch1 = np.concatenate([y for _, y in cl])
    assert len(set(epoch0.tolist())) == len(set(epoch1.tolist())) == 32
    assert epoch0.tolist() != epoch1.tolist()
    for x, y in cl.batches(0):
        assert x.shape[1] in (72, 144, 288, 576)
        assert x.shape[1] >= max(len(docs[i]) for i in y)


def test_clas_loader_errors_are_clear():
    with pytest.raises(ValueError, match='labels must be 2 integer class ids'):
        ClasLoader(_docs([3, 4]), labels=['pos', 'neg'])
    with pytest.raises(ValueError, match='document #1 is empty'):
        ClasLoader([np.arange(3), np.arange(0)], labels=[0, 1])
    with pytest.raises(ValueError, match='bucket_lens must be multiples of bptt=72'):
        ClasLoader(_docs([100]), labels=[0], bucket_lens=[72])
    with pytest.raises(ValueError, match='bs=0 must be a positive integer'):
        ClasLoader(_docs([3, 4]), labels=[0, 1], bs=0)


def test_clas_batches_resume_at_a_position():
    docs = _docs(list(range(5, 105, 3)))
    cl = ClasLoader(docs, labels=[i % 2 for i in range(len(docs))], bs=4, seed=1)
    full, tail = list(cl.batches(1)), list(cl.batches(1, start=2))
    assert [y.tolist() for _, y in tail] == [y.tolist() for _, y in full[2:]]


def test_clas_loader_pads_the_last_batch_and_gives_each_process_its_rows():
    docs = _docs([5, 80, 3, 150, 70])
    whole = list(ClasLoader(docs, labels=[0, 1, 0, 1, 2], bs=4, bptt=72, shuffle=False, pad_last=True))
    x, y = whole[-1]   # the short last batch: doc 2, then 3 rows that count in nothing
    assert x.shape == (4, 72) and y.tolist() == [0, PAD_LABEL, PAD_LABEL, PAD_LABEL]
    np.testing.assert_array_equal(x[0], pad_chunk(docs[2], 72, 72))
    filler = np.full(72, 1)
    filler[0] = docs[2][0]   # one token (the batch's first document's first) on a chunk start
    assert all((row == filler).all() for row in x[1:])
    for drop_last, pad_last in ((False, True), (True, False)):   # two processes: rows 0-1 and 2-3
        shares = [list(ClasLoader(docs, labels=[0, 1, 0, 1, 2], bs=4, bptt=72, seed=3, drop_last=drop_last,
                                  pad_last=pad_last, rows=rows).batches(1)) for rows in (slice(0, 2), slice(2, 4))]
        full = list(ClasLoader(docs, labels=[0, 1, 0, 1, 2], bs=4, bptt=72, seed=3, drop_last=drop_last,
                               pad_last=pad_last).batches(1))
        assert len(full) == (1 if drop_last else 2)
        for (x0, y0), (x1, y1), (x, y) in zip(*shares, full):
            np.testing.assert_array_equal(np.concatenate([x0, x1]), x)
            np.testing.assert_array_equal(np.concatenate([y0, y1]), y)
    with pytest.raises(ValueError, match='pass pad_last=True or drop_last=True'):
        ClasLoader(docs, labels=[0] * 5, bs=4, shuffle=False, rows=slice(0, 2))
    with pytest.raises(ValueError, match='selects none'):
        ClasLoader(docs, labels=[0] * 5, bs=4, rows=slice(4, 8))


def test_category_map_sorted_saved_and_strict(tmp_path):
    cats = CategoryMap.from_labels(['pos', 'neg', 'pos', 'neutral'])
    assert cats.classes == ['neg', 'neutral', 'pos']
    assert cats.encode(['pos', 'neg']).tolist() == [2, 0]
    cats.save(tmp_path / 'labels.json')
    assert CategoryMap.load(tmp_path / 'labels.json').classes == cats.classes
    with pytest.raises(ValueError, match=r"validation labels hold labels absent from training "
                                         r"\['positive'\]"):
        cats.encode(['pos', 'positive'], where='validation labels')
    (tmp_path / 'vocab.json').write_text('{"format": "flax_ulmfit.vocab/1"}')
    with pytest.raises(ValueError, match='not a flax_ulmfit.labels/1 file'):
        CategoryMap.load(tmp_path / 'vocab.json')



def test_category_map_refuses_ids_out_of_range_and_one_string():
    cats = CategoryMap(['neg', 'pos'])
    assert cats.decode([1, 0]) == ['pos', 'neg']
    for bad in ([-1], [2], [0.5]):
        with pytest.raises(ValueError, match=r"ids must be integers in \[0, 2\)"):
            cats.decode(bad)
    with pytest.raises(TypeError, match='got one str'):
        CategoryMap.from_labels('pos')
    with pytest.raises(TypeError, match='got one str'):
        cats.encode('pos')
