"""AWD-LSTM behaviour that needs no torch: configs, dropout switching, masks, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_ulmfit.interop import flax_to_torch, torch_to_flax
from flax_ulmfit.models import (AWDLSTM, LanguageModel, awd_lstm_clas_config, awd_lstm_lm_config,
                                dropout_mask)
from tests.mask_checks import check_independent, check_mask

SMALL = dict(awd_lstm_lm_config, emb_sz=6, n_hid=8, n_layers=2)


def small_lm(**kwargs):
  return LanguageModel(20, SMALL, rngs=nnx.Rngs(0, dropout=1), **kwargs)


def test_configs_equal_fastai_v2_defaults():
  # Values from fastai 2.8's awdlstm.py (REFERENCE.md), written out, not imported.
  assert awd_lstm_lm_config == dict(emb_sz=400, n_hid=1152, n_layers=3, pad_token=1, bidir=False,
                                    output_p=0.1, hidden_p=0.15, input_p=0.25, embed_p=0.02,
                                    weight_p=0.2, tie_weights=True, out_bias=True)
  assert awd_lstm_clas_config == dict(emb_sz=400, n_hid=1152, n_layers=3, pad_token=1, bidir=False,
                                      output_p=0.4, hidden_p=0.3, input_p=0.4, embed_p=0.05,
                                      weight_p=0.5)


def test_default_model_sizes_and_drop_mult():
  lm = LanguageModel(16, drop_mult=0.5, rngs=nnx.Rngs(0))
  sizes = [(r.in_features, r.hidden_size) for r in lm.encoder.rnns]
  assert sizes == [(400, 1152), (1152, 1152), (1152, 400)]
  assert lm.encoder.encoder_dp.p == pytest.approx(0.01)
  assert lm.encoder.weight_dps[0].p == pytest.approx(0.1)
  assert lm.decoder.output_dp.p == pytest.approx(0.05)
  embedding = np.asarray(lm.encoder.encoder[...])
  assert embedding.min() >= -0.1 and embedding.max() <= 0.1 and embedding.std() > 0.05
  assert np.all(np.asarray(lm.decoder.bias[...]) == 0)


def test_dropout_mask_statistics():
  mask = np.asarray(dropout_mask(jax.random.key(0), (400, 500), 0.2))
  assert set(np.unique(mask)) == {0.0, np.float32(1 / 0.8)}
  assert abs((mask == 0).mean() - 0.2) < 0.005  # 200k draws: std of the rate is ~0.0009
  with pytest.raises(ValueError, match='p=1.0'):
    dropout_mask(jax.random.key(0), (2,), 1.0)


def test_mask_bits_are_threefry_and_independent_across_keys_and_positions():
  """The bits behind every mask are JAX's own Threefry-2x32 (our unrolled copy runs faster on
  CPU); masks of different keys, and neighbouring elements of one mask, are uncorrelated."""
  from jax.extend.random import threefry_2x32
  from flax_ulmfit.models.dropout import threefry2x32
  rng = np.random.default_rng(0)
  key, count = rng.integers(0, 2 ** 32, 2, np.uint32), rng.integers(0, 2 ** 32, (2, 1000), np.uint32)
  ours = np.stack([np.asarray(w) for w in threefry2x32(*map(jnp.uint32, key), *map(jnp.asarray, count))])
  np.testing.assert_array_equal(ours, np.asarray(threefry_2x32(jnp.asarray(key), jnp.asarray(count))))
  a = np.asarray(dropout_mask(jax.random.key(1), (500, 400), 0.5)).ravel() > 0
  b = np.asarray(dropout_mask(jax.random.key(2), (500, 400), 0.5)).ravel() > 0
  # 200k fair coins: a correlation's standard deviation is ~0.0022; 0.01 is 4.5 of them.
  assert abs(np.corrcoef(a, b)[0, 1]) < 0.01 and abs(np.corrcoef(a[1:], a[:-1])[0, 1]) < 0.01


def test_masks_drawn_from_a_key_equal_sample_masks_and_their_gradients():
  """`encoder(tokens, key=k)` draws `sample_masks(k, B)`; its weight masks are redrawn in the
  backward pass (not kept), which gives the gradients of the explicit-mask path."""
  encoder = AWDLSTM(20, 6, 8, 2, hidden_p=0.3, input_p=0.3, embed_p=0.2, weight_p=0.5, rngs=nnx.Rngs(0))
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 20
  key = jax.random.key(5)

  def loss(model, masks, key):
    out, (state, _) = model(ids, None, masks, key=key)
    return jnp.sum(out ** 2) + jnp.sum(state[0] ** 2)

  with_key, key_grads = nnx.value_and_grad(loss)(encoder, None, key)
  with_masks, mask_grads = nnx.value_and_grad(loss)(encoder, encoder.sample_masks(key, 2), None)
  np.testing.assert_allclose(with_key, with_masks, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(key_grads), jax.tree.leaves(mask_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  weight_grad = np.asarray(key_grads['rnns'][0]['weight_hh'][...])
  dropped = np.asarray(encoder.sample_masks(key, 2)['weight'][0]) == 0
  assert dropped.any() and np.all(weight_grad[dropped] == 0) and np.abs(weight_grad).max() > 0


# Sizes where every mask has >= 2,048 entries: a drop rate's standard deviation is <= 0.011.
STATS_CONFIG = dict(awd_lstm_lm_config, emb_sz=32, n_hid=32, n_layers=3, output_p=0.3, hidden_p=0.25,
                    input_p=0.35, embed_p=0.2, weight_p=0.4)
STATS_VOCAB, STATS_BATCH = 4096, 64


def _masks_by_site(lm, draw):
  """{site: (mask, p)} with each mask from `draw(masks_of_one_forward_pass)`."""
  masks, enc = draw(), lm.encoder
  out = {'embed': (masks['embed'], enc.encoder_dp.p), 'input': (masks['input'], enc.input_dp.p),
         'output': (masks['output'], lm.decoder.output_dp.p)}
  out |= {f'weight{l}': (m, enc.weight_dps[l].p) for l, m in enumerate(masks['weight'])}
  out |= {f'hidden{l}': (m, enc.hidden_dps[l].p) for l, m in enumerate(masks['hidden'])}
  return out


def _drawn_by_the_sites(lm):
  """One forward pass's masks as each dropout site draws them when none is given: each site
  applied to ones returns its mask (RNNDropout's time-major output turned back to (B, 1, F))."""
  enc, ones = lm.encoder, lambda *shape: jnp.ones(shape)
  rnn_mask = lambda dp, f: jnp.swapaxes(dp(ones(1, STATS_BATCH, f)), 0, 1)  # noqa: E731
  return dict(embed=enc.encoder_dp(ones(STATS_VOCAB, 1)), input=rnn_mask(enc.input_dp, 32),
              output=rnn_mask(lm.decoder.output_dp, 32),
              weight=[dp(jnp.ones_like(rnn.weight_hh[...])) for dp, rnn in zip(enc.weight_dps, enc.rnns)],
              hidden=[rnn_mask(dp, 32) for dp in enc.hidden_dps])


@pytest.mark.parametrize('path', ['sample_masks', 'sites'])
def test_masks_the_model_draws_have_fastais_statistics_and_are_independent(path):
  """Through the model's own drawing paths (`sample_masks`, which the train step uses, and each
  site drawing on demand): every site's mask has its shape, the values {0, 1/(1-p)} (fastai's
  `dropout_mask`) and a drop rate near p; masks of different layers, of different sites with
  the same shape, and of consecutive steps are independent draws."""
  lm = LanguageModel(STATS_VOCAB, STATS_CONFIG, rngs=nnx.Rngs(0, dropout=1))
  if path == 'sample_masks':
    steps = [_masks_by_site(lm, lambda k=k: lm.sample_masks(jax.random.key(k), STATS_BATCH)) for k in (0, 1)]
  else:
    steps = [_masks_by_site(lm, lambda: _drawn_by_the_sites(lm)) for _ in range(2)]
  shapes = dict(embed=(STATS_VOCAB, 1), input=(STATS_BATCH, 1, 32), output=(STATS_BATCH, 1, 32),
                weight0=(128, 32), weight1=(128, 32), weight2=(128, 32), hidden0=(STATS_BATCH, 1, 32),
                hidden1=(STATS_BATCH, 1, 32))
  assert set(steps[0]) == set(shapes)
  for site, (mask, p) in steps[0].items():
    check_mask(mask, shapes[site], p, site)
    check_independent(mask, p, steps[1][site][0], p, f'{site}: step 1 vs step 2')
  for a, b in [('weight0', 'weight1'), ('weight1', 'weight2'), ('weight0', 'weight2'),
               ('hidden0', 'hidden1'), ('input', 'output')]:
    check_independent(*steps[0][a], *steps[0][b], f'{a} vs {b}')


def test_train_mode_draws_fresh_masks_and_eval_is_deterministic():
  lm = small_lm()
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 20
  first, second = lm(ids)[0], lm(ids)[0]
  assert not np.allclose(first, second)  # new masks every call
  lm.eval()
  np.testing.assert_array_equal(lm(ids)[0], lm(ids)[0])
  lm.train()
  masks = lm.sample_masks(jax.random.key(3), 2)
  np.testing.assert_array_equal(lm(ids, None, masks)[0], lm(ids, None, masks)[0])


def test_state_none_equals_zero_state_and_state_shapes():
  lm = small_lm()
  lm.eval()
  ids = jnp.ones((3, 4), jnp.int32)
  logits, state, extras = lm(ids)
  np.testing.assert_array_equal(logits, lm(ids, lm.zero_state(3))[0])
  assert logits.shape == (3, 4, 20) and logits.dtype == jnp.float32
  assert [tuple(h.shape) for h, _ in state] == [(3, 8), (3, 6)]
  assert extras.raw.shape == extras.dropped.shape == (3, 4, 6)


def test_jit_and_eager_agree():
  lm = small_lm()
  lm.eval()
  ids = jnp.arange(8, dtype=jnp.int32).reshape(2, 4)
  eager = lm(ids)[0]
  jitted = nnx.jit(lambda model, x: model(x)[0])(lm, ids)
  np.testing.assert_allclose(eager, jitted, atol=1e-6)


@pytest.mark.parametrize('tokens, message', [
    (jnp.array([[0, 20]]), r'in \[0, 20\).*from 0 to 20'),
    (jnp.array([[-1, 3]]), r'from -1 to 3'),
    (jnp.ones((2, 3), jnp.float32), 'integer ids'),
    (jnp.ones((6,), jnp.int32), r'\(batch, seq_len\)'),
])
def test_bad_tokens_raise_value_errors_naming_the_problem(tokens, message):
  with pytest.raises(ValueError, match=message):
    small_lm()(tokens)


def test_state_of_the_wrong_shape_is_rejected():
  lm = small_lm()
  with pytest.raises(ValueError, match=r'state must be 2 pairs \(h, c\).*batch size 3'):
    lm(jnp.ones((3, 4), jnp.int32), lm.zero_state(2))


def test_masks_of_the_wrong_shape_are_rejected():
  lm = small_lm()
  masks = lm.sample_masks(jax.random.key(0), 2)
  with pytest.raises(ValueError, match=r'RNNDropout: mask has shape \(2, 1, 6\), expected \(3, 1, 6\)'):
    lm(jnp.ones((3, 4), jnp.int32), None, masks)


def test_converter_names_missing_extra_and_misshapen_keys():
  lm = small_lm()
  state_dict = flax_to_torch(lm)
  missing = {k: v for k, v in state_dict.items() if k != '1.decoder.bias'}
  with pytest.raises(KeyError, match=r"missing keys \['1.decoder.bias'\]"):
    torch_to_flax(missing, small_lm())
  with pytest.raises(KeyError, match=r"unexpected keys \['extra'\]"):
    torch_to_flax(dict(state_dict, extra=np.zeros(1)), small_lm())
  wrong = dict(state_dict)
  wrong['0.rnns.1.module.weight_ih_l0'] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match=r"weight_ih_l0'\] has shape \(3, 3\), the model expects \(24, 8\)"):
    torch_to_flax(wrong, small_lm())
  nan = dict(state_dict)
  nan['0.rnns.0.weight_hh_l0_raw'] = np.full_like(state_dict['0.rnns.0.weight_hh_l0_raw'], np.nan)
  with pytest.raises(ValueError, match=r"weight_hh_l0_raw'\] contains NaN"):
    torch_to_flax(nan, small_lm())
  untied = dict(state_dict)
  untied['1.decoder.weight'] = state_dict['1.decoder.weight'] + 1
  with pytest.raises(ValueError, match='ties them'):
    torch_to_flax(untied, small_lm())


def test_converter_leaves_the_model_untouched_on_error():
  lm = small_lm()
  before = flax_to_torch(lm)
  misshapen = {k: np.zeros_like(v) for k, v in before.items()}
  misshapen['1.decoder.bias'] = np.zeros(3, np.float32)
  untied = {k: np.zeros_like(v) for k, v in before.items()}
  untied['1.decoder.weight'] += 1
  for bad in (misshapen, untied):
    with pytest.raises(ValueError):
      torch_to_flax(bad, lm)
  after = flax_to_torch(lm)
  for key in before:
    np.testing.assert_array_equal(before[key], after[key])


def test_encoder_alone_converts_with_fastai_encoder_keys():
  encoder = AWDLSTM(20, 6, 8, 2, rngs=nnx.Rngs(0))
  state_dict = flax_to_torch(encoder)
  assert '0.encoder.weight' not in state_dict and 'rnns.1.weight_hh_l0_raw' in state_dict
  other = torch_to_flax(state_dict, AWDLSTM(20, 6, 8, 2, rngs=nnx.Rngs(5)))
  np.testing.assert_array_equal(other.rnns[1].weight_hh[...], encoder.rnns[1].weight_hh[...])


def test_bidirectional_is_refused_clearly():
  with pytest.raises(NotImplementedError, match='bidir'):
    LanguageModel(20, dict(SMALL, bidir=True), rngs=nnx.Rngs(0))


def test_unknown_config_key_is_refused():
  with pytest.raises(ValueError, match=r"unknown config keys \['hidden_size'\]"):
    LanguageModel(20, dict(SMALL, hidden_size=3), rngs=nnx.Rngs(0))


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32_logits():
  fp32 = small_lm()
  bf16 = small_lm(dtype=jnp.bfloat16)
  nnx.update(bf16, nnx.state(fp32, nnx.Param))
  for model in (fp32, bf16):
    model.eval()
  ids = jnp.arange(24, dtype=jnp.int32).reshape(3, 8) % 20
  ref_logits, ref_state, _ = fp32(ids)
  logits, state, _ = bf16(ids)
  assert logits.dtype == jnp.float32 and state[0][1].dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  # bf16 keeps 8 mantissa bits (relative rounding 2**-8 = 0.4%); after two layers and 8
  # steps the error measured 0.3% of the outputs' scale; 1% allows a few more roundings.
  for ours, ref in ((logits, ref_logits), (state[-1][1], ref_state[-1][1])):
    assert float(jnp.abs(ours - ref).max()) <= 0.01 * float(jnp.abs(ref).max())

  def loss(model):  # cross-entropy of token 0 everywhere: gradients through every layer and step
    return -jax.nn.log_softmax(model(ids)[0])[..., 0].mean()
  grads, ref_grads = nnx.grad(loss)(bf16), nnx.grad(loss)(fp32)
  assert all(g.dtype == jnp.float32 and bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  # The hand-written LSTM backward in bf16 (gate math in fp32, matmuls on bf16 operands):
  # measured within 1.4% of each parameter's largest fp32 gradient entry; bound 3%.
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert float(jnp.abs(g - ref).max()) <= 0.03 * float(jnp.abs(ref).max())


@pytest.mark.parametrize('tied', [True, False])
def test_encode_and_output_layer_reproduce_the_forward_pass(tied):
  """`encode` + `output_layer` (what the fused LM loss uses) give `lm(...)`'s state and logits."""
  config = dict(awd_lstm_lm_config, emb_sz=6, n_hid=10, n_layers=2, tie_weights=tied, out_bias=tied)
  lm = LanguageModel(20, config, rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 20, (3, 4)), jnp.int32)
  masks = lm.sample_masks(jax.random.key(2), 3)
  logits, state, extras = lm(ids, None, masks)
  enc_state, enc_extras = lm.encode(ids, None, masks)
  weight, bias = lm.output_layer()
  np.testing.assert_array_equal(weight, (lm.encoder.encoder if tied else lm.decoder.weight)[...])
  assert (bias is None) == (not tied)
  for a, b in zip(jax.tree.leaves((state, extras)), jax.tree.leaves((enc_state, enc_extras))):
    np.testing.assert_array_equal(a, b)
  expected = np.asarray(enc_extras.dropped) @ np.asarray(weight).T + (0 if bias is None else np.asarray(bias))
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
