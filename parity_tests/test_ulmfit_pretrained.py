"""fastai's pretrained-model path against fastai 2.8 itself (golden/make_fastai_pretrained.py).

Pins down: `match_embeds` (rows of known words copied, a word repeated in the old vocabulary
taken from its last occurrence, unknown words given the mean row and the mean decoder bias;
encoder, its dropout copy and the tied decoder all rebuilt; with and without a decoder
bias), and `load_pretrained` on files fastai wrote itself (`learn.save(with_opt=True)`, whose
optimizer state holds numpy scalars and fastcore `L`s, and `save_pickle`'s itos): our model
then gives the logits of fastai's own `load_pretrained`ed learner. Old-format files (the
`.module.weight_hh_l0` copies that `clean_raw_keys` drops, torch's legacy non-zip format,
a JSON vocabulary) load to the same model.
Tolerances: copied rows exact; mean rows 1e-7 absolute (fastai sums the 20 rows, |w| < 0.2,
in float32: up to ~20 * 6e-8 * 0.1 of rounding; we sum in float64 and round once); logits
1e-5 (the fp32 forward bound).
"""
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flax_ulmfit import ulmfit
from flax_ulmfit.models import LanguageModel

HERE = Path(__file__).parent / 'golden'
GOLDEN = np.load(HERE / 'fastai_pretrained.npz', allow_pickle=False)
OLD_VOCAB, NEW_VOCAB = [str(t) for t in GOLDEN['old_vocab']], [str(t) for t in GOLDEN['new_vocab']]
CONFIG = json.loads(str(GOLDEN['config']))
STATE_DICT = {k.removeprefix('state_dict/'): GOLDEN[k] for k in GOLDEN.files if k.startswith('state_dict/')}
WEIGHTS, ITOS = HERE / 'fastai_lm_with_opt.pth', HERE / 'fastai_itos.pkl'


def expected(case: str) -> dict[str, np.ndarray]:
  return {k.removeprefix(f'{case}/'): GOLDEN[k] for k in GOLDEN.files if k.startswith(f'{case}/')}


@pytest.mark.parametrize('case', ['with_bias', 'no_bias'])
def test_match_embeds_equals_fastai(case):
  dropped = ('1.decoder.bias', '0.encoder_dp.emb.weight') if case == 'no_bias' else ()
  old = {k: v.copy() for k, v in STATE_DICT.items() if k not in dropped}
  got, want = ulmfit.match_embeds(old, OLD_VOCAB, NEW_VOCAB), expected(case)
  assert list(got) == list(want)
  known = np.array([w in OLD_VOCAB for w in NEW_VOCAB])
  assert known.any() and not known.all()
  assert NEW_VOCAB.count('the') == 1 and OLD_VOCAB.count('the') == 2  # the repeated word is exercised
  for key, value in want.items():
    if key.startswith(('0.encoder', '1.decoder')):
      np.testing.assert_array_equal(got[key][known], value[known], err_msg=key)  # copied rows: exact
      np.testing.assert_allclose(got[key][~known], value[~known], rtol=0, atol=1e-7, err_msg=key)
    else:
      np.testing.assert_array_equal(got[key], value, err_msg=key)
  for key, value in old.items():  # the input is not modified
    np.testing.assert_array_equal(value, STATE_DICT[key])


def logits_of(lm: LanguageModel) -> np.ndarray:
  lm.eval()
  return np.asarray(lm(jnp.asarray(GOLDEN['tokens'], jnp.int32))[0])


def test_load_pretrained_on_fastai_files_gives_fastai_logits():
  lm = ulmfit.load_pretrained(LanguageModel(len(NEW_VOCAB), CONFIG, rngs=nnx.Rngs(0)), WEIGHTS, ITOS, NEW_VOCAB)
  assert np.abs(logits_of(lm) - GOLDEN['logits']).max() <= 1e-5


@pytest.mark.parametrize('legacy_zip', [False, True])
def test_old_format_files_load_to_the_same_model(tmp_path, legacy_zip):
  """A bare state_dict with the old `.module.weight_hh_l0` copies, and the vocabulary as JSON."""
  old = {}
  for key, value in STATE_DICT.items():
    old[key] = torch.from_numpy(value.copy())
    if key.endswith('weight_hh_l0_raw'):  # where old fastai saved the module's own copy
      old[key.replace('weight_hh_l0_raw', 'module.weight_hh_l0')] = torch.zeros_like(old[key])
  torch.save(old, tmp_path / 'lm.pth', _use_new_zipfile_serialization=not legacy_zip)
  (tmp_path / 'itos.json').write_text(json.dumps(OLD_VOCAB))
  lm = ulmfit.load_pretrained(LanguageModel(len(NEW_VOCAB), CONFIG, rngs=nnx.Rngs(0)),
                              tmp_path / 'lm.pth', tmp_path / 'itos.json', NEW_VOCAB)
  assert np.abs(logits_of(lm) - GOLDEN['logits']).max() <= 1e-5
