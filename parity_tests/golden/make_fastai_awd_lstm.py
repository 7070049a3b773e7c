"""Writes fastai_awd_lstm.npz: a fastai 2.8 AWD-LSTM language model's state_dict and its
eval-mode logits on two consecutive batches (state carried), for test_fastai_golden.py.

Needs fastai (a scratch venv: `pip install -c constraints.txt fastai==2.8.*`); the tests
read only the .npz. Run from the repository root:
  python parity_tests/golden/make_fastai_awd_lstm.py
"""
import json
from pathlib import Path

import numpy as np
import torch
from fastai.text.models.awdlstm import AWD_LSTM
from fastai.text.models.core import get_language_model

VOCAB = 37
CONFIG = dict(emb_sz=10, n_hid=14, n_layers=3, pad_token=1, bidir=False, output_p=0.1,
              hidden_p=0.15, input_p=0.25, embed_p=0.02, weight_p=0.2, tie_weights=True,
              out_bias=True)


def main():
  torch.manual_seed(0)
  model = get_language_model(AWD_LSTM, VOCAB, config=dict(CONFIG))
  with torch.no_grad():
    model[1].decoder.bias.uniform_(-0.1, 0.1)
  model.eval()
  model.reset()
  ids = np.random.default_rng(0).integers(0, VOCAB, (3, 16)).astype(np.int64)
  ids[0, :2] = CONFIG['pad_token']
  with torch.no_grad():
    logits = [model(torch.from_numpy(half))[0].numpy() for half in (ids[:, :8], ids[:, 8:])]
  state = {f'state_dict/{k}': v.numpy() for k, v in model.state_dict().items()}
  out = Path(__file__).with_name('fastai_awd_lstm.npz')
  np.savez(out, tokens=ids, logits_batch1=logits[0], logits_batch2=logits[1],
           config=json.dumps(CONFIG), vocab=VOCAB, **state)
  print(f'wrote {out} ({len(state)} state_dict entries)')


if __name__ == '__main__':
  main()
