"""Checks that fastai 2.8 itself accepts what `ulmfit.save_pretrained` and `ulmfit.save_encoder` write.

Exports a small Flax language model (its `.pth` state_dict, `.pkl` itos and encoder `.pth`),
then, in the fastai venv:
  1. `language_model_learner(...).load_pretrained(pth, pkl)` on a new, overlapping vocabulary,
  2. `language_model_learner(..., pretrained_fnames=[name, name])` on the same new vocabulary,
  3. `text_classifier_learner(...).load_encoder(name)` on the exported vocabulary;
and compares: fastai's eval logits after 1 and 2 with ours after `ulmfit.load_pretrained` of
the same files (<= 1e-5), and the classifier's encoder with ours (bit-exact).
Not a test (CI has no fastai). From the repository root, with the project's venv:
  PYTHONPATH=. .venv/bin/python parity_tests/golden/check_fastai_loads_export.py [FASTAI_PYTHON]
FASTAI_PYTHON defaults to /tmp/fastai-venv/bin/python.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_ulmfit import ulmfit
from flax_ulmfit.interop import flax_to_torch
from flax_ulmfit.models import LanguageModel

SPECIALS = ['xxunk', 'xxpad', 'xxbos', 'xxeos', 'xxfld', 'xxrep', 'xxwrep', 'xxup', 'xxmaj']
VOCAB = SPECIALS + [f'w{i}' for i in range(20)] + ['xxfake'] * 3
NEW_VOCAB = SPECIALS + [f'w{i}' for i in range(10, 30)] + ['xxfake'] * 3
CONFIG = dict(emb_sz=8, n_hid=12, n_layers=2)

FASTAI_SIDE = r'''
import json, sys
from pathlib import Path
import numpy as np, torch
from fastai.text.all import (AWD_LSTM, CrossEntropyLossFlat, DataLoaders, LMDataLoader, awd_lstm_clas_config,
                             awd_lstm_lm_config, language_model_learner, text_classifier_learner)
work = Path(sys.argv[1]); spec = json.loads((work / 'spec.json').read_text())

def dls_with(vocab):
  ids = [torch.randint(0, len(vocab), (40,)) for _ in range(4)]
  dls = DataLoaders(LMDataLoader(ids, bs=2, seq_len=8), LMDataLoader(ids, bs=2, seq_len=8))
  dls.vocab = vocab
  return dls

def logits(learn):
  learn.model.eval(); learn.model.reset()
  with torch.no_grad():
    return learn.model(torch.tensor(spec['tokens']))[0].numpy()

lm_config = dict(awd_lstm_lm_config, **spec['config'])
learn = language_model_learner(dls_with(spec['new_vocab']), AWD_LSTM, config=dict(lm_config), pretrained=False)
learn.load_pretrained(work / 'ours.pth', work / 'ours.pkl')
by_files = logits(learn)
learn = language_model_learner(dls_with(spec['new_vocab']), AWD_LSTM, config=dict(lm_config), path=work,
                               model_dir='.', pretrained_fnames=['ours', 'ours'])
by_fnames = logits(learn)
clas = text_classifier_learner(dls_with(spec['vocab']), AWD_LSTM, config=dict(awd_lstm_clas_config, **spec['config']),
                               n_out=3, pretrained=False, path=work, model_dir='.', loss_func=CrossEntropyLossFlat())
clas.load_encoder('ours_enc')
encoder = {k: v.numpy() for k, v in clas.model[0].module.state_dict().items()}
np.savez(work / 'fastai.npz', by_files=by_files, by_fnames=by_fnames, **{f'encoder/{k}': v for k, v in encoder.items()})
'''


def main(fastai_python: str) -> None:
  work = Path(tempfile.mkdtemp())
  lm = LanguageModel(len(VOCAB), CONFIG, rngs=nnx.Rngs(0))
  lm.decoder.bias[...] = jnp.linspace(-0.1, 0.1, len(VOCAB))
  ulmfit.save_pretrained(lm, VOCAB, work / 'ours')
  ulmfit.save_encoder(lm, work / 'ours_enc.pth')
  tokens = np.random.default_rng(0).integers(0, len(NEW_VOCAB), (3, 10))
  (work / 'spec.json').write_text(json.dumps(dict(config=CONFIG, vocab=VOCAB, new_vocab=NEW_VOCAB,
                                                  tokens=tokens.tolist())))
  (work / 'fastai_side.py').write_text(FASTAI_SIDE)
  subprocess.run([fastai_python, str(work / 'fastai_side.py'), str(work)], check=True)
  theirs = np.load(work / 'fastai.npz')

  ours = ulmfit.load_pretrained(LanguageModel(len(NEW_VOCAB), CONFIG, rngs=nnx.Rngs(1)),
                                work / 'ours.pth', work / 'ours.pkl', NEW_VOCAB)
  ours.eval()
  our_logits = np.asarray(ours(jnp.asarray(tokens, jnp.int32))[0])
  for key in ('by_files', 'by_fnames'):
    diff = np.abs(our_logits - theirs[key]).max()
    print(f'fastai load_pretrained ({key}): logits max-abs-diff {diff:.2e}')
    assert diff <= 1e-5, key
  encoder = flax_to_torch(lm.encoder)
  assert sorted(encoder) == sorted(k.removeprefix('encoder/') for k in theirs.files if k.startswith('encoder/'))
  for key, value in encoder.items():
    np.testing.assert_array_equal(theirs[f'encoder/{key}'], value, err_msg=key)
  print(f'fastai load_encoder: all {len(encoder)} encoder tensors bit-exact')
  print('OK: fastai 2.8 loads our exported language model and encoder')


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else '/tmp/fastai-venv/bin/python')
