"""The recipe room (`flax_ulmfit.ulmfit`): fastai's splitters, freeze_to, slice rates, stage
optimizers and presets, and the pretrained-model files (round trips and bad input).

fastai behaviours checked against fastai itself live in parity_tests/test_ulmfit_*.py.
"""
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flax_ulmfit import ulmfit
from flax_ulmfit.interop import fastai_files, flax_to_torch
from flax_ulmfit.models import LanguageModel, TextClassifier
from flax_ulmfit.train import optim

TINY = dict(emb_sz=4, n_hid=6, n_layers=3)
VOCAB = [f'w{i}' for i in range(16)]


def tiny_lm(vocab_sz=len(VOCAB), seed=0):
  return LanguageModel(vocab_sz, TINY, rngs=nnx.Rngs(seed))


def groups_of(labels) -> dict[str, str]:
  return {optim.path_str(p): g for p, g in jax.tree_util.tree_flatten_with_path(labels)[0]}


def moved(model, tx, grads_value=1.0) -> dict[str, bool]:
  """Which parameters one update of `tx` (all gradients `grads_value`) changes."""
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(lambda p: jnp.full_like(p, grads_value), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return {optim.path_str(p): bool(jnp.any(u != 0)) for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}


def test_group_lrs_reads_floats_and_slices_as_fastai():
  assert ulmfit.group_lrs(2e-2, 4) == [2e-2] * 4
  np.testing.assert_allclose(ulmfit.group_lrs(slice(1e-2 / 2.6 ** 4, 1e-2), 5),
                             [1e-2 / 2.6 ** 4, 1e-2 / 2.6 ** 3, 1e-2 / 2.6 ** 2, 1e-2 / 2.6, 1e-2], rtol=1e-12)
  np.testing.assert_allclose(ulmfit.group_lrs(slice(1e-3), 3), [1e-4, 1e-4, 1e-3], rtol=1e-12)
  with pytest.raises(ValueError, match='slice'):
    ulmfit.group_lrs(slice(1e-3, 1e-2, 2), 3)


def test_frozen_groups_is_fastai_freeze_to():
  groups = ('embeds', 'rnn0', 'rnn1', 'rnn2', 'head')
  assert ulmfit.frozen_groups(groups, -1) == ('embeds', 'rnn0', 'rnn1', 'rnn2')  # freeze
  assert ulmfit.frozen_groups(groups, -2) == ('embeds', 'rnn0', 'rnn1')
  assert ulmfit.frozen_groups(groups, 0) == ()  # unfreeze
  assert ulmfit.frozen_groups(groups, 2) == ('embeds', 'rnn0')
  for bad in (5, -6):
    with pytest.raises(ValueError, match='freeze_to'):
      ulmfit.frozen_groups(groups, bad)


def test_lm_split_groups_and_frozen_stage_trains_only_embedding_and_decoder():
  lm = tiny_lm()
  split = ulmfit.awd_lstm_lm_split(3)
  assert split.groups == ('rnn0', 'rnn1', 'rnn2', 'embeds')
  labels = groups_of(optim.label_params(nnx.state(lm, nnx.Param), split.rules))
  assert labels == {'decoder/bias': 'embeds', 'encoder/encoder': 'embeds',
                    **{f'encoder/rnns/{l}/{w}': f'rnn{l}' for l in range(3)
                       for w in ('bias_hh', 'bias_ih', 'weight_hh', 'weight_ih')}}
  (frozen, tx_frozen), (_, tx_all) = ulmfit.stage_optimizers(lm, split, ulmfit.LM_FINETUNE, steps_per_epoch=4)
  assert frozen.freeze_to == -1
  assert {k for k, m in moved(lm, tx_frozen).items() if m} == {'decoder/bias', 'encoder/encoder'}
  assert all(moved(lm, tx_all).values())


def test_weight_decay_spares_the_decoder_bias_but_not_lstm_biases():
  """fastai's rule sees `.bias` attributes only: the LSTM's bias_ih/bias_hh decay (measured in fastai)."""
  lm = tiny_lm()
  (_, tx), = ulmfit.stage_optimizers(lm, ulmfit.awd_lstm_lm_split(3), ulmfit.LM_PRETRAIN, steps_per_epoch=1)
  decayed = {k for k, m in moved(lm, tx, grads_value=0.0).items() if m}  # zero gradients: only wd moves
  assert 'decoder/bias' not in decayed
  assert {'encoder/encoder', 'encoder/rnns/0/bias_ih', 'encoder/rnns/2/bias_hh'} <= decayed


def tiny_clf():
  return TextClassifier(len(VOCAB), 5, TINY, rngs=nnx.Rngs(0))


def test_classifier_split_and_gradual_unfreezing_stages():
  clf, split = tiny_clf(), ulmfit.awd_lstm_clas_split(3)
  assert split.groups == ('embeds', 'rnn0', 'rnn1', 'rnn2', 'head')
  labels = groups_of(optim.label_params(nnx.state(clf, nnx.Param), split.rules))
  assert labels['encoder/module/encoder'] == 'embeds'
  assert labels['encoder/module/rnns/1/weight_hh'] == 'rnn1'
  assert {g for k, g in labels.items() if k.startswith('head/')} == {'head'}
  trained = []
  for stage, tx in ulmfit.stage_optimizers(clf, split, ulmfit.CLASSIFIER, steps_per_epoch=3):
    trained.append(sorted({labels[k] for k, m in moved(clf, tx).items() if m}))
    params = nnx.state(clf, nnx.Param)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    peaks = ulmfit.group_lrs(stage.lr, 5)
    for group, peak in zip(split.groups, peaks):
      used = optim.hyperparams(state, group)
      if group in trained[-1]:  # one-cycle starts at lr_max / 25, each group at its own lr_max
        np.testing.assert_allclose(float(used['learning_rate']), peak / 25, rtol=1e-6)
  assert trained == [['head'], ['head', 'rnn2'], ['head', 'rnn1', 'rnn2'], ['embeds', 'head', 'rnn0', 'rnn1', 'rnn2']]


def test_classifier_head_batchnorm_is_exempt_from_weight_decay():
  clf = tiny_clf()
  (_, tx), *_ = ulmfit.stage_optimizers(clf, ulmfit.awd_lstm_clas_split(3), ulmfit.CLASSIFIER, steps_per_epoch=1)
  decayed = {k for k, m in moved(clf, tx, grads_value=0.0).items() if m}
  # frozen encoder: no update at all; the head's BatchNorms are exempt, its linear kernels decay
  assert decayed == {'head/layers/0/linear/kernel', 'head/layers/1/linear/kernel'}


def test_stage_optimizers_refuses_a_split_that_does_not_fit_the_model():
  with pytest.raises(ValueError, match=r"groups \['rnn3'\] hold no parameter"):
    ulmfit.stage_optimizers(tiny_lm(), ulmfit.awd_lstm_lm_split(4), ulmfit.LM_FINETUNE, steps_per_epoch=2)
  with pytest.raises(ValueError, match='matches no rule'):
    ulmfit.stage_optimizers(tiny_lm(), ulmfit.awd_lstm_lm_split(2), ulmfit.LM_FINETUNE, steps_per_epoch=2)
  with pytest.raises(ValueError, match='steps_per_epoch'):
    ulmfit.stage_optimizers(tiny_lm(), ulmfit.awd_lstm_lm_split(3), ulmfit.LM_FINETUNE, steps_per_epoch=0)


@pytest.mark.parametrize('change, match', [
    (dict(clip=-1.0), 'clip=-1.0'), (dict(wd=float('nan')), 'wd=nan'), (dict(moms=(0.8, 0.7)), 'moms'),
    (dict(stages=()), 'stages is empty'),
    (dict(stages=(ulmfit.Stage('none', 0, 1e-3, 0),)), "stage 'none' must train >= 1 epoch"),
    (dict(stages=(ulmfit.Stage('neg', 1, -1e-3, 0),)), 'positive and finite'),
    (dict(stages=(ulmfit.Stage('deep', 1, 1e-3, -5),)), 'freeze_to must be in'),
])
def test_bad_recipes_are_refused_before_training(change, match):
  with pytest.raises(ValueError, match=match):
    ulmfit.stage_optimizers(tiny_lm(), ulmfit.awd_lstm_lm_split(3), ulmfit.LM_FINETUNE._replace(**change), 2)


def test_presets_are_fastai_tutorial_recipes():
  assert [s.freeze_to for s in ulmfit.CLASSIFIER.stages] == [-1, -2, -3, 0]
  assert [s.epochs for s in ulmfit.CLASSIFIER.stages] == [1, 1, 1, 2]
  assert ulmfit.CLASSIFIER.drop_mult == 0.5 and ulmfit.CLASSIFIER.moms == (0.8, 0.7, 0.8)
  assert [(s.freeze_to, s.lr) for s in ulmfit.LM_FINETUNE.stages] == [(-1, 2e-2), (0, 2e-3)]
  assert dict(ulmfit.LM_PRETRAIN.config)['weight_p'] == 0.5
  with pytest.raises(TypeError):
    ulmfit.LM_PRETRAIN.config['weight_p'] = 0.1  # presets are read-only


# --- fastai's files ---------------------------------------------------------------------------

@pytest.mark.parametrize('protocol', range(pickle.HIGHEST_PROTOCOL + 1))
def test_itos_pickle_of_every_protocol_reads_back(tmp_path, protocol):
  itos = ['xxunk', 'xxpad', 'héllo', 'xxfake', 'xxfake', '\n▁']
  (tmp_path / 'itos.pkl').write_bytes(pickle.dumps(itos, protocol=protocol))
  assert fastai_files.read_itos(tmp_path / 'itos.pkl') == itos


class _Exploit:
  def __reduce__(self):
    return (os.system, ('touch pwned',))


@pytest.mark.parametrize('payload, match', [
    ([_Exploit()], 'refusing'),                      # a global + call: never executed
    ({'xxunk': 0}, 'refusing'),                      # a dict, not a list
    ([1, 2, 3], 'refusing'),                         # ints
    ((['a'], ['b']), 'refusing'),                    # a tuple
    ([['a'], 'b'], 'non-string items'),              # nested lists pass the opcode check, not the type check
    ([], 'non-empty list'),
])
def test_itos_pickle_that_is_not_a_list_of_strings_is_refused(tmp_path, monkeypatch, payload, match):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'itos.pkl').write_bytes(pickle.dumps(payload, protocol=4))
  with pytest.raises(ValueError, match=match):
    fastai_files.read_itos(tmp_path / 'itos.pkl')
  assert not (tmp_path / 'pwned').exists()


def test_itos_bad_files(tmp_path):
  good = pickle.dumps(['a', 'b', 'c'], protocol=4)
  (tmp_path / 'cut.pkl').write_bytes(good[:-3])
  with pytest.raises(ValueError, match='truncated'):
    fastai_files.read_itos(tmp_path / 'cut.pkl')
  (tmp_path / 'cut.json').write_text('["a", "b"')
  with pytest.raises(ValueError, match='not readable JSON'):
    fastai_files.read_itos(tmp_path / 'cut.json')
  (tmp_path / 'bom.json').write_bytes(b'\xef\xbb\xbf' + json.dumps(['a', 'ü']).encode())
  assert fastai_files.read_itos(tmp_path / 'bom.json') == ['a', 'ü']  # a BOM, as some editors write
  (tmp_path / 'vocab.json').write_text(json.dumps({'format': 'flax_ulmfit.vocab/1', 'itos': ['a', 'b']}))
  assert fastai_files.read_itos(tmp_path / 'vocab.json') == ['a', 'b']  # what Vocab.save writes
  with pytest.raises(FileNotFoundError):
    fastai_files.read_itos(tmp_path / 'missing.pkl')


def test_state_dict_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError):
    fastai_files.read_state_dict(tmp_path / 'missing.pth')
  path = fastai_files.write_state_dict(tmp_path / 'lm.pth', flax_to_torch(tiny_lm()))
  (tmp_path / 'cut.pth').write_bytes(path.read_bytes()[:-100])
  (tmp_path / 'text.pth').write_text('not a torch file')
  torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
  torch.save({'model': {'w': 'not a tensor'}}, tmp_path / 'strings.pth')
  torch.save([_Exploit()], tmp_path / 'exploit.pth')
  for name, match in [('cut', 'truncated'), ('text', 'torch.load'), ('tensor', 'not a state_dict'),
                      ('strings', 'not named tensors'), ('exploit', 'weights_only')]:
    with pytest.raises(ValueError, match=match):
      fastai_files.read_state_dict(tmp_path / f'{name}.pth')


def test_non_finite_weights_are_never_written(tmp_path):
  lm = tiny_lm()
  files = ulmfit.save_pretrained(lm, VOCAB, tmp_path / 'wt')
  before = [f.read_bytes() for f in files]
  lm.decoder.bias[...] = lm.decoder.bias[...].at[3].set(jnp.nan)
  with pytest.raises(ValueError, match=r"\['1.decoder.bias'\] hold NaN"):
    ulmfit.save_pretrained(lm, VOCAB[::-1], tmp_path / 'wt')  # neither the weights nor the vocabulary change
  assert [f.read_bytes() for f in files] == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['wt.pkl', 'wt.pth']


def test_save_pretrained_round_trip_and_vocabulary_transfer(tmp_path):
  lm = tiny_lm(seed=1)
  pth, pkl = ulmfit.save_pretrained(lm, VOCAB, tmp_path / 'wt')
  assert (pth.name, pkl.name) == ('wt.pth', 'wt.pkl')
  assert fastai_files.read_itos(pkl) == VOCAB
  assert not list(tmp_path.glob('.*.tmp'))  # no temporary files left
  same = ulmfit.load_pretrained(tiny_lm(seed=2), pth, pkl, VOCAB)
  for key, value in flax_to_torch(lm).items():
    np.testing.assert_array_equal(flax_to_torch(same)[key], value, err_msg=key)
  shuffled = VOCAB[::-1] + ['new']
  moved_lm = ulmfit.load_pretrained(tiny_lm(len(shuffled), seed=3), pth, pkl, shuffled)
  emb, new_emb = np.asarray(lm.encoder.encoder[...]), np.asarray(moved_lm.encoder.encoder[...])
  np.testing.assert_array_equal(new_emb[:16], emb[::-1])
  np.testing.assert_allclose(new_emb[16], emb.mean(0), rtol=1e-6)


def test_save_encoder_writes_the_awd_lstm_state_dict(tmp_path):
  lm = tiny_lm()
  path = ulmfit.save_encoder(lm, tmp_path / 'enc.pth')
  sd = fastai_files.read_state_dict(path)
  assert list(sd) == list(flax_to_torch(lm.encoder))
  assert list(sd)[:2] == ['encoder.weight', 'encoder_dp.emb.weight']
  with pytest.raises(TypeError, match='save_encoder'):
    ulmfit.save_encoder(object(), tmp_path / 'x.pth')


def test_load_pretrained_bad_input_names_what_is_wrong(tmp_path):
  pth, pkl = ulmfit.save_pretrained(tiny_lm(), VOCAB, tmp_path / 'wt')
  fastai_files.write_itos(tmp_path / 'short.pkl', VOCAB[:-1])
  with pytest.raises(ValueError, match='15 tokens but the embedding .* has 16 rows'):
    ulmfit.load_pretrained(tiny_lm(), pth, tmp_path / 'short.pkl', VOCAB)
  with pytest.raises(ValueError, match='new_vocab has 17 tokens but lm was built for 16'):
    ulmfit.load_pretrained(tiny_lm(), pth, pkl, VOCAB + ['x'])
  with pytest.raises(TypeError, match='new_vocab must be a list of tokens'):
    ulmfit.load_pretrained(tiny_lm(), pth, pkl, 'w0 w1')
  wider = LanguageModel(len(VOCAB), dict(TINY, n_hid=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'wt.pth: .*the model expects'):
    ulmfit.load_pretrained(wider, pth, pkl, VOCAB)
  fastai_files.write_state_dict(tmp_path / 'enc.pth', flax_to_torch(tiny_lm().encoder))
  with pytest.raises(KeyError, match='not a fastai AWD-LSTM language model'):
    ulmfit.load_pretrained(tiny_lm(), tmp_path / 'enc.pth', pkl, VOCAB)
  with pytest.raises(ValueError, match='old_vocab has 3 tokens'):
    ulmfit.match_embeds(flax_to_torch(tiny_lm()), ['a', 'b', 'c'], VOCAB)


# --- Stage runners (end to end with real kills: tests/test_script_classifier.py, test_script_ulmfit.py) ---

def test_with_stages_keeps_fastai_slices_and_skips_stages_of_no_epochs():
  recipe = ulmfit.with_stages(ulmfit.CLASSIFIER, [2, 0, 1, 3], [3e-2, 1e-2, 6e-3, 2e-3], wd=0.1)
  assert [s.name for s in recipe.stages] == ['head', 'last_three', 'all'] and recipe.wd == 0.1
  assert [s.epochs for s in recipe.stages] == [2, 1, 3]
  assert recipe.stages[0].lr == 3e-2
  assert recipe.stages[2].lr == slice(2e-3 / 2.6 ** 4, 2e-3)
  np.testing.assert_allclose(recipe.stages[1].lr.start, 6e-3 / 2.6 ** 4, rtol=1e-12)
  with pytest.raises(ValueError, match='one epoch count and one rate per stage'):
    ulmfit.with_stages(ulmfit.CLASSIFIER, [1, 1], [1e-2, 1e-3])


def test_run_recipe_refuses_stage_names_that_cannot_name_folders_and_resume_without_a_folder():
  lm = tiny_lm()
  bad = ulmfit.LM_FINETUNE._replace(stages=(ulmfit.Stage('a/b', 1, 1e-3, 0),))
  with pytest.raises(ValueError, match='distinct words'):
    ulmfit.train_lm(lm, None, None, bad)
  twice = ulmfit.LM_FINETUNE._replace(stages=(ulmfit.Stage('x', 1, 1e-3, 0),) * 2)
  with pytest.raises(ValueError, match='distinct words'):
    ulmfit.train_lm(lm, None, None, twice)
  with pytest.raises(ValueError, match='need out='):
    ulmfit.train_lm(lm, None, None, resume=True)
