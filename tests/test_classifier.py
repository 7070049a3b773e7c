"""Text classifier behaviour that needs no torch: construction, the BPT3C semantics, masks and
modes, bf16, the loss, bad input and bad weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_ulmfit.interop import flax_to_torch, load_encoder, torch_to_flax
from flax_ulmfit.models import AWDLSTM, LanguageModel, TextClassifier, awd_lstm_clas_config
from flax_ulmfit.text.data import ClasLoader, pad_chunk
from flax_ulmfit.text.labels import PAD_LABEL
from flax_ulmfit.train.clas import clas_batch_check, clas_loss
from tests.mask_checks import check_independent, check_mask

VOCAB, N_CLASS, SEQ_LEN = 23, 4, 4
SMALL = dict(emb_sz=6, n_hid=8, n_layers=2)


def small(max_len=8, **kwargs):
  return TextClassifier(VOCAB, N_CLASS, SMALL, seq_len=SEQ_LEN, max_len=max_len,
                        rngs=nnx.Rngs(params=0, dropout=1), **kwargs)


def padded(lengths, n_tokens, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.stack([pad_chunk(rng.integers(2, VOCAB, n), n_tokens, SEQ_LEN) for n in lengths]))


def test_defaults_follow_fastai_get_text_classifier():
  """fastai 2.8: awd_lstm_clas_config scaled by drop_mult (text_classifier_learner's 0.5),
  head [3 * emb_sz, 50, n_class] with dropouts [output_p * drop_mult, 0.1] (ps unscaled),
  BatchNorm weight 1 and bias 1e-3, Linear without bias and torch's default init."""
  clf = TextClassifier(16, 5, rngs=nnx.Rngs(0))
  module = clf.encoder.module
  assert [(r.in_features, r.hidden_size) for r in module.rnns] == [(400, 1152), (1152, 1152), (1152, 400)]
  assert module.encoder_dp.p == pytest.approx(0.025) and module.weight_dps[0].p == pytest.approx(0.25)
  assert module.input_dp.p == pytest.approx(0.2) and module.hidden_dps[0].p == pytest.approx(0.15)
  assert (clf.encoder.seq_len, clf.encoder.max_len, clf.encoder.pad_idx) == (72, 1440, 1)
  assert clf.head.ps == pytest.approx((0.2, 0.1))
  kernels = [layer.linear.kernel[...] for layer in clf.head.layers]
  assert [k.shape for k in kernels] == [(1200, 50), (50, 5)]
  assert all(layer.linear.bias is None for layer in clf.head.layers)
  for kernel in kernels:  # uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1 / np.sqrt(kernel.shape[0])
    assert float(jnp.abs(kernel).max()) <= bound and float(jnp.abs(kernel).max()) > 0.9 * bound
  for layer in clf.head.layers:
    np.testing.assert_array_equal(layer.bn.scale[...], 1.0)
    np.testing.assert_allclose(layer.bn.bias[...], 1e-3)
  # Parameters: embedding 16*400; LSTMs 4H(I + H) + 8H each; head BN 2*1200 + 2*50, linear 1200*50 + 50*5.
  lstm = sum(4 * h * (i + h) + 8 * h for i, h in [(400, 1152), (1152, 1152), (1152, 400)])
  expected = 16 * 400 + lstm + 2 * 1200 + 2 * 50 + 1200 * 50 + 50 * 5
  assert sum(p.size for p in jax.tree.leaves(nnx.state(clf, nnx.Param))) == expected


def test_config_is_merged_over_the_classifier_preset():
  clf = TextClassifier(VOCAB, 2, dict(emb_sz=6, n_hid=8), drop_mult=1.0, lin_ftrs=[5, 3], ps=[0.0, 0.3],
                       rngs=nnx.Rngs(0))
  assert clf.encoder.module.n_layers == awd_lstm_clas_config['n_layers']
  assert clf.encoder.module.input_dp.p == awd_lstm_clas_config['input_p']
  assert clf.head.ps == (0.4, 0.0, 0.3)
  assert [layer.linear.kernel.shape for layer in clf.head.layers] == [(18, 5), (5, 3), (3, 2)]


@pytest.mark.parametrize('kwargs, match', [
    (dict(config=dict(tie_weights=True)), 'unknown config keys'),
    (dict(lin_ftrs=[5], ps=[0.1, 0.2]), 'one dropout per hidden size'),
    (dict(n_class=0), 'n_class must be >= 1'),
    (dict(max_len=6), 'max_len must be a positive multiple of seq_len=4'),
    (dict(seq_len=0), 'seq_len must be >= 1'),
])
def test_bad_construction_arguments_raise(kwargs, match):
  args = dict(vocab_sz=VOCAB, n_class=N_CLASS, config=SMALL, seq_len=SEQ_LEN, max_len=8) | kwargs
  with pytest.raises(ValueError, match=match):
    TextClassifier(args.pop('vocab_sz'), args.pop('n_class'), args.pop('config'), rngs=nnx.Rngs(0), **args)


@pytest.mark.parametrize('tokens, match', [
    (np.ones((2, 8), np.int32), 'row 0 is all padding'),
    (np.array([[5, 6, 7, 1, 1, 1, 1, 1]], np.int32), 'ends with 5 pads'),
    (np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 1]], np.int32), 'multiple of seq_len=4'),
    (np.array([[1, 1, 5, 6, 7, 8, 9, 10]], np.int32), 'starts its text at column 2'),
    (np.array([[1, 1, 1, 1, 1, 1, 1, 1, 5, 6, 7, 1]], np.int32), None),  # leading whole chunks: fine
    (np.array([[5, 6, 7, 8, 9, 10, 11, VOCAB]], np.int32), r'token ids must be in \[0, 23\)'),
    (np.array([[5.0, 6.0, 7.0, 8.0]], np.float32), 'integer ids'),
    (np.array([5, 6, 7, 8], np.int32), r'\(batch, seq_len\)'),
])
def test_tokens_not_padded_as_clasloader_pads_them_raise(tokens, match):
  clf = small()
  clf.eval()
  if match is None:
    assert clf(jnp.asarray(tokens)).shape == (1, N_CLASS)
  else:
    with pytest.raises(ValueError, match=match):
      clf(jnp.asarray(tokens))


def test_clasloader_batches_are_accepted_and_give_float32_logits():
  docs = [np.random.default_rng(i).integers(2, VOCAB, n).astype(np.int32) for i, n in enumerate([3, 9, 14, 6, 11])]
  clf = small()
  clf.eval()
  for x, y in ClasLoader(docs, [0, 1, 2, 3, 0], bs=3, bptt=SEQ_LEN, shuffle=False):
    logits, outputs = clf.classify(jnp.asarray(x))
    assert logits.shape == (len(x), N_CLASS) and logits.dtype == jnp.float32
    assert outputs.shape == (len(x), min(x.shape[1], 8), SMALL['emb_sz'])  # the kept window


def test_eval_logits_of_a_row_do_not_depend_on_other_rows_or_leading_padding():
  """What fastai gets by running only started rows: each row starts from a zero state at its
  first chunk, so in eval a row's logits are those of the row alone, and whole chunks of
  padding in front (a larger ClasLoader bucket) change nothing."""
  clf = small(max_len=None)
  clf.eval()
  lengths = (14, 9, 5, 2)
  together = clf.classify(padded(lengths, 16))[0]
  for i, n in enumerate(lengths):
    alone = clf(padded(lengths, 16)[i:i + 1])
    np.testing.assert_allclose(alone[0], together[i], atol=1e-6, rtol=0)
  bucketed = clf.classify(padded(lengths, 24))[0]
  np.testing.assert_allclose(bucketed, together, atol=1e-6, rtol=0)


def test_chunks_before_the_window_feed_the_state_but_get_no_gradient():
  """fastai keeps the chunks within the last max_len tokens; earlier chunks only feed the
  state (detached): a word seen only there changes the logits but its embedding gets
  exactly no gradient, while a word inside the window gets one."""
  clf = small(max_len=8)
  clf.eval()
  tokens = np.array(padded([16], 16))
  tokens[0, :8], tokens[0, 8:] = 3, 4  # word 3 only before the window, word 4 only inside
  other = tokens.copy()
  other[0, :8] = 5

  def loss(model, x):
    return model(x).sum()

  grads = nnx.grad(loss)(clf, jnp.asarray(tokens))
  embedding_grad = np.asarray(grads['encoder']['module']['encoder'][...])
  assert np.all(embedding_grad[3] == 0) and np.abs(embedding_grad[4]).max() > 0
  assert float(jnp.abs(clf(jnp.asarray(tokens)) - clf(jnp.asarray(other))).max()) > 1e-4


def test_train_mode_masks_key_and_sample_masks_agree():
  """Train mode draws fresh masks per call, `sample_masks(k, B, L)` for the next key k of the
  `dropout` stream; a key draws them chunk by chunk inside the scan, and `sample_masks(key, B, L)`
  gives exactly those masks; eval is deterministic."""
  clf = small()
  tokens = padded((12, 7, 3), 12)
  stream = nnx.clone(clf).encoder.rngs  # yields the keys clf's calls will take
  first, second = clf(tokens), clf(tokens)
  assert float(jnp.abs(first - second).max()) > 1e-4
  for logits, key in zip((first, second), (stream(), stream())):
    np.testing.assert_allclose(logits, clf(tokens, clf.sample_masks(key, 3, 12)), atol=1e-6, rtol=0)
  key = jax.random.key(7)
  masks = clf.sample_masks(key, 3, 12)
  assert masks['encoder']['weight'][0].shape == (3, 4 * 8, 8)  # (chunks, 4H, H)
  assert masks['encoder']['input'].shape == (3, 3, 1, 6) and [m.shape for m in masks['head']] == [(3, 18), (3, 50)]
  with_key = clf.classify(tokens, key=key)
  with_masks = clf.classify(tokens, masks)
  for a, b in zip(with_key, with_masks):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  assert float(jnp.abs(clf.classify(tokens, key=jax.random.key(8))[0] - with_key[0]).max()) > 1e-4
  clf.eval()
  np.testing.assert_array_equal(clf(tokens), clf(tokens))


# fastai's defaults (drop_mult 0.5, head ps [0.1]) at sizes where every mask has >= 2,048 entries
# (a drop rate's standard deviation <= 0.011; masks a bug made equal keep entries together at
# 1 - p instead of (1 - p)**2, >= 7 standard deviations off even for the embedding's p = 0.025).
STATS_VOCAB, STATS_BATCH, STATS_CHUNKS = 8192, 64, 3
STATS_P = dict(embed=0.025, input=0.2, weight=0.25, hidden=0.15)  # awd_lstm_clas_config x 0.5
STATS_SHAPES = dict(embed=(STATS_VOCAB, 1), input=(STATS_BATCH, 1, 32), weight0=(128, 32), weight1=(128, 32),
                    weight2=(128, 32), hidden0=(STATS_BATCH, 1, 32), hidden1=(STATS_BATCH, 1, 32))


def _chunk_masks(encoder_masks, c):
  """{site: (its mask in chunk c, p)} from `sample_masks(...)['encoder']`."""
  out = {'embed': (encoder_masks['embed'][c], STATS_P['embed']), 'input': (encoder_masks['input'][c], STATS_P['input'])}
  out |= {f'weight{l}': (m[c], STATS_P['weight']) for l, m in enumerate(encoder_masks['weight'])}
  return out | {f'hidden{l}': (m[c], STATS_P['hidden']) for l, m in enumerate(encoder_masks['hidden'])}


def test_masks_the_classifier_draws_have_fastais_statistics_and_are_fresh_per_chunk():
  """fastai's SentenceEncoder runs every chunk as a separate forward pass, so each chunk draws
  fresh masks (before the kept window too), and the head draws one (B, n_in) mask per block.
  Through the classifier's own drawing path (`sample_masks` for the keys of its `dropout`
  stream: what a call draws, test_train_mode_masks_key_and_sample_masks_agree): shapes, values
  {0, 1/(1-p)}, drop rates near p (the config's times drop_mult; the head's 0.1 unscaled), and
  masks independent across chunks, layers, sites, head blocks and steps."""
  clf = TextClassifier(STATS_VOCAB, N_CLASS, dict(emb_sz=32, n_hid=32), seq_len=SEQ_LEN, max_len=2 * SEQ_LEN,
                       rngs=nnx.Rngs(params=0, dropout=1))
  steps = [clf.sample_masks(clf.encoder.rngs(), STATS_BATCH, STATS_CHUNKS * SEQ_LEN) for _ in range(2)]
  encoder, next_step = steps[0]['encoder'], steps[1]['encoder']
  assert all(m.shape[0] == STATS_CHUNKS for m in jax.tree.leaves(encoder))  # the chunk before the window too
  for c in range(STATS_CHUNKS):
    chunk = _chunk_masks(encoder, c)
    assert set(chunk) == set(STATS_SHAPES)
    for site, (mask, p) in chunk.items():
      check_mask(mask, STATS_SHAPES[site], p, f'{site}, chunk {c}')
      check_independent(mask, p, *_chunk_masks(encoder, (c + 1) % STATS_CHUNKS)[site], f'{site}: chunk {c} vs the next')
      check_independent(mask, p, *_chunk_masks(next_step, c)[site], f'{site}, chunk {c}: step 1 vs 2')
    for a, b in [('weight0', 'weight1'), ('weight1', 'weight2'), ('weight0', 'weight2'),
                 ('hidden0', 'hidden1'), ('input', 'hidden0')]:
      check_independent(*chunk[a], *chunk[b], f'chunk {c}: {a} vs {b}')
  head, head_p = steps[0]['head'], (0.2, 0.1)  # output_p x 0.5 for the pooled features; ps unscaled
  for i, (mask, n_in, p) in enumerate(zip(head, (96, 50), head_p)):
    check_mask(mask, (STATS_BATCH, n_in), p, f'head block {i}')
    check_independent(mask, p, steps[1]['head'][i], p, f'head block {i}: step 1 vs 2')
  check_independent(head[0], head_p[0], head[1], head_p[1], 'head block 0 vs 1')


def test_jit_and_eager_agree():
  clf = small()
  clf.eval()
  tokens = padded((12, 7, 3), 12)
  np.testing.assert_allclose(clf(tokens), nnx.jit(lambda model, x: model(x))(clf, tokens), atol=1e-6, rtol=0)


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32_logits():
  fp32, bf16 = small(), small(dtype=jnp.bfloat16)
  nnx.update(bf16, nnx.state(fp32, nnx.Param))
  tokens = padded((12, 7, 3), 12)
  for model in (fp32, bf16):
    model.eval()
  ref, logits = fp32(tokens), bf16(tokens)
  assert logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  # bf16 keeps 8 mantissa bits (relative rounding 0.4%) through 12 steps of 2 LSTM layers and
  # the head; measured within 1% of the logits' scale, bound 3%.
  assert float(jnp.abs(logits - ref).max()) <= 0.03 * float(jnp.abs(ref).max())

  def loss(model):
    return clas_loss(model, (tokens, jnp.array([0, 1, 2]), None), None)[0]

  grads, ref_grads = nnx.grad(loss)(bf16), nnx.grad(loss)(fp32)
  # Gradients with bf16 matmul operands: measured within 2% of each parameter's largest fp32
  # gradient entry; bound 5%.
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert g.dtype == jnp.float32
    assert float(jnp.abs(g - r).max()) <= 0.05 * float(jnp.abs(r).max())


def test_clas_loss_metrics_and_ar_tar_in_training_only():
  clf = small()
  tokens, labels = padded((12, 7, 3), 12), jnp.array([0, 3, 1], jnp.int32)
  key = jax.random.key(0)
  loss, (carry, metrics) = clas_loss(clf, (tokens, labels), key)
  assert carry is None and float(metrics['count']) == 3.0
  logits, outputs = clf.classify(tokens, key=key)
  log_p = jax.nn.log_softmax(logits)
  cross_entropy = -float(jnp.mean(log_p[jnp.arange(3), labels]))
  ar = 2 * float(jnp.mean(outputs ** 2))
  tar = float(jnp.mean((outputs[:, 1:] - outputs[:, :-1]) ** 2))
  assert float(metrics['loss']) == pytest.approx(cross_entropy, abs=1e-6)  # what fastai records
  assert float(loss) == pytest.approx(cross_entropy + ar + tar, abs=1e-6)
  assert float(metrics['accuracy']) == pytest.approx(float(jnp.mean(jnp.argmax(logits, -1) == labels)))
  clf.eval()
  loss, (_, metrics) = clas_loss(clf, (tokens, labels), None)
  assert float(loss) == float(metrics['loss'])  # evaluation: no AR/TAR


def test_padding_rows_count_in_no_loss_or_metric():
  """Rows labelled PAD_LABEL (`ClasLoader(pad_last=True)`) change neither the loss nor the
  accuracy of the real rows; `count` is the real rows."""
  clf = small()
  clf.eval()
  tokens, labels = padded((12, 7, 3), 12), jnp.array([0, 3, 1], jnp.int32)
  filler = padded((1,), 12)
  loss, (_, metrics) = clas_loss(clf, (tokens, labels), None)
  padded_batch = (jnp.concatenate([tokens, filler, filler]), jnp.array([0, 3, 1, PAD_LABEL, PAD_LABEL]))
  clas_batch_check(clf)(padded_batch)  # the padding passes the host check
  padded_loss, (_, padded_metrics) = nnx.jit(lambda model, batch: clas_loss(model, batch, None))(clf, padded_batch)
  assert float(padded_metrics['count']) == 3.0
  # the same 3 per-row losses summed and divided by 3 in another order: rounding only
  assert float(padded_loss) == pytest.approx(float(loss), rel=1e-6)
  assert float(padded_metrics['accuracy']) == pytest.approx(float(metrics['accuracy']), abs=1e-7)


def test_labels_outside_n_class_raise_or_poison_the_jitted_loss():
  clf = small()
  clf.eval()
  tokens = padded((12, 7, 3), 12)
  for bad in ([0, 4, 1], [0, -2, 1]):  # (-1 is PAD_LABEL: a padding row)
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 4\)'):
      clas_loss(clf, (tokens, jnp.array(bad)), None)
  jitted = nnx.jit(lambda model, batch: clas_loss(model, batch, None)[0])
  assert np.isnan(float(jitted(clf, (tokens, jnp.array([0, -2, 1])))))
  assert np.isnan(float(jitted(clf, (tokens, jnp.array([0, 4, 1])))))
  assert np.isfinite(float(jitted(clf, (tokens, jnp.array([0, 3, 1])))))
  with pytest.raises(ValueError, match=r'labels of shape \(2,\)'):
    clas_loss(clf, (tokens, jnp.array([0, 1])), None)


def test_host_batch_check_names_bad_labels_and_bad_padding():
  """`clas_batch_check(clf)` for make_train_step/make_eval_step: inside jit neither a label
  outside n_class nor a text off its chunk boundary could raise."""
  check = clas_batch_check(small())
  tokens = np.asarray(padded((12, 7, 3), 12))
  check((tokens, np.array([0, 3, 1])))
  with pytest.raises(ValueError, match=r'clas batch: labels must lie in \[0, 4\), got 7'):
    check((tokens, np.array([0, 7, 1])))
  with pytest.raises(TypeError, match='integer ids'):
    check((tokens, np.array([0.0, 1.0, 1.0])))
  shifted = np.roll(tokens, 1, axis=1)
  with pytest.raises(ValueError, match='row 1 starts its text at column 5'):
    check((shifted, np.array([0, 3, 1])))


def test_weights_of_another_vocabulary_or_config_raise_before_writing():
  clf = small()
  state_dict = flax_to_torch(clf)
  before = jax.tree.map(np.asarray, nnx.state(clf, nnx.Param))
  other_vocab = flax_to_torch(TextClassifier(VOCAB + 8, N_CLASS, SMALL, seq_len=SEQ_LEN, max_len=8, rngs=nnx.Rngs(3)))
  with pytest.raises(ValueError, match=r'vocabulary of 31 ids, the model 23.*match_embeds'):
    torch_to_flax(other_vocab, clf)
  other_head = flax_to_torch(TextClassifier(VOCAB, N_CLASS, SMALL, seq_len=SEQ_LEN, max_len=8, lin_ftrs=[9],
                                            rngs=nnx.Rngs(3)))
  with pytest.raises(ValueError, match=r"1.layers.0.2.weight'\] has shape \(9, 18\)"):
    torch_to_flax(other_head, clf)
  with pytest.raises(KeyError, match=r"missing keys \['0.module.rnns.1"):
    torch_to_flax({k: v for k, v in state_dict.items() if '.rnns.1.' not in k}, clf)
  corrupt = dict(state_dict, **{'1.layers.1.2.weight': np.full_like(state_dict['1.layers.1.2.weight'], np.nan)})
  with pytest.raises(ValueError, match='NaN'):
    torch_to_flax(corrupt, clf)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(clf, nnx.Param))):
    np.testing.assert_array_equal(a, b)  # nothing was written


def test_load_encoder_takes_an_encoder_state_dict_and_names_the_fix_otherwise():
  clf = small()
  lm = LanguageModel(VOCAB, {**awd_lstm_clas_config, **SMALL, 'tie_weights': True, 'out_bias': True}, rngs=nnx.Rngs(4))
  with pytest.raises(KeyError, match='a whole model; pass its encoder'):
    load_encoder(flax_to_torch(lm), clf)
  load_encoder(flax_to_torch(lm.encoder), clf)
  for a, b in zip(jax.tree.leaves(nnx.state(lm.encoder, nnx.Param)), jax.tree.leaves(nnx.state(clf.encoder.module, nnx.Param))):
    np.testing.assert_array_equal(a, b)
  bigger = AWDLSTM(VOCAB + 1, 6, 8, 2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='vocabulary of 24 ids'):
    load_encoder(flax_to_torch(bigger), clf)
