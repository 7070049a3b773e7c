"""Writes the golden files of fastai's pretrained-model path, for test_ulmfit_pretrained.py:

- fastai_lm_with_opt.pth: a tiny AWD-LSTM language model trained one epoch, saved by fastai's
  `learn.save(with_opt=True)` (`{'model': state_dict, 'opt': optimizer state}`, the optimizer
  state holding numpy scalars and fastcore `L`s);
- fastai_itos.pkl: its vocabulary, written by fastai's `save_pickle`;
- fastai_pretrained.npz: the two vocabularies (they overlap; the old one repeats 'the' and
  'xxfake'), fastai's `match_embeds` on the state_dict (`with_bias/`) and on it without the
  decoder bias and the `encoder_dp` copy (`no_bias/`), and the eval logits of a new
  `language_model_learner` on the new vocabulary after `learn.load_pretrained(pth, pkl)`.

Needs fastai (the scratch venv); the tests read only these files. From the repository root:
  /tmp/fastai-venv/bin/python parity_tests/golden/make_fastai_pretrained.py
"""
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from fastai.text.all import (AWD_LSTM, DataLoaders, LMDataLoader, awd_lstm_lm_config, language_model_learner,
                             match_embeds, save_pickle)

SPECIALS = ['xxunk', 'xxpad', 'xxbos', 'xxeos', 'xxfld', 'xxrep', 'xxwrep', 'xxup', 'xxmaj']
OLD_VOCAB = SPECIALS + ['the', 'cat', 'dog', 'sat', 'on', 'the', 'mat', '.', 'xxfake', 'xxfake', 'xxfake']
NEW_VOCAB = SPECIALS + ['the', 'dog', 'bird', 'mat', 'tree', 'runs', '.', 'cat', 'sky', 'sat'] + ['xxfake'] * 5
CONFIG = dict(awd_lstm_lm_config, emb_sz=8, n_hid=12, n_layers=2)
HERE = Path(__file__).parent


def lm_learner(vocab, path, seed):
  torch.manual_seed(seed)
  ids = [torch.randint(0, len(vocab), (40,)) for _ in range(6)]
  dls = DataLoaders(LMDataLoader(ids, bs=2, seq_len=8), LMDataLoader(ids[:2], bs=2, seq_len=8))
  dls.vocab = vocab
  return language_model_learner(dls, AWD_LSTM, config=dict(CONFIG), pretrained=False, path=path)


def main():
  work = Path(tempfile.mkdtemp())
  learn = lm_learner(OLD_VOCAB, work, seed=0)
  with learn.no_bar(), learn.no_logging():
    learn.fit_one_cycle(1, 1e-2)
  shutil.copy(learn.save('lm', with_opt=True), HERE / 'fastai_lm_with_opt.pth')
  save_pickle(HERE / 'fastai_itos.pkl', OLD_VOCAB)

  state = {k: v.clone() for k, v in learn.model.state_dict().items()}
  with_bias = match_embeds({k: v.clone() for k, v in state.items()}, OLD_VOCAB, NEW_VOCAB)
  trimmed = {k: v.clone() for k, v in state.items() if k not in ('1.decoder.bias', '0.encoder_dp.emb.weight')}
  no_bias = match_embeds(trimmed, OLD_VOCAB, NEW_VOCAB)

  new = lm_learner(NEW_VOCAB, work, seed=1)
  new.load_pretrained(HERE / 'fastai_lm_with_opt.pth', HERE / 'fastai_itos.pkl')
  new.model.eval()
  new.model.reset()
  tokens = np.random.default_rng(0).integers(0, len(NEW_VOCAB), (3, 10)).astype(np.int64)
  with torch.no_grad():
    logits = new.model(torch.from_numpy(tokens))[0].numpy()
  np.savez(HERE / 'fastai_pretrained.npz', old_vocab=np.array(OLD_VOCAB), new_vocab=np.array(NEW_VOCAB),
           config=json.dumps(CONFIG), tokens=tokens, logits=logits,
           **{f'state_dict/{k}': v.numpy() for k, v in state.items()},
           **{f'with_bias/{k}': v.numpy() for k, v in with_bias.items()},
           **{f'no_bias/{k}': v.numpy() for k, v in no_bias.items()})
  shutil.rmtree(work)
  print(f'wrote fastai_lm_with_opt.pth, fastai_itos.pkl, fastai_pretrained.npz in {HERE}')


if __name__ == '__main__':
  main()
