"""Writes fastai_classifier.npz: a small fastai 2.8 text classifier (`get_text_classifier(AWD_LSTM,
...)`), batches padded by fastai's own `pad_chunk`, its eval logits, and one training batch run
by fastai's `TextLearner` (cross-entropy + RNNRegularizer's AR/TAR), for test_fastai_classifier.py.

fastai's dropout draws are replaced by numpy draws that are recorded (in call order: per chunk
the embedding mask, the input mask, then per layer the weight mask and the hidden mask; then
one mask per head dropout), and written in our per-chunk layout (rows that do not run in a
chunk get ones). Stored: the training logits, the loss before and after AR/TAR, every
parameter's gradient, and the BatchNorm running statistics after the batch; and the parameter
groups of fastai's `awd_lstm_clas_split` (state_dict names per group, first to last) and the
parameters `norm_bias_params` finds (those `wd_bn_bias=False` keeps from weight decay).

Needs fastai (a scratch venv: `pip install -c constraints.txt fastai==2.8.*`); the tests read
only the .npz. Run from the repository root:
  PYTHONPATH=. /tmp/fastai-venv/bin/python parity_tests/golden/make_fastai_classifier.py
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.rnn import RNNRegularizer
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.losses import CrossEntropyLossFlat
from fastai.text.data import pad_chunk
from fastai.text.learner import TextLearner
from fastai.text.models import awdlstm
from fastai.text.models.awdlstm import AWD_LSTM, awd_lstm_clas_split
from fastai.text.models.core import get_text_classifier
from fastai.torch_core import norm_bias_params

VOCAB, N_CLASS, SEQ_LEN, MAX_LEN = 37, 3, 5, 10
CONFIG = dict(emb_sz=10, n_hid=14, n_layers=3, pad_token=1, bidir=False, output_p=0.3,
              hidden_p=0.3, input_p=0.3, embed_p=0.2, weight_p=0.4)
LIN_FTRS, PS = [7], [0.2]
DOC_LENS = (23, 17, 10, 9, 3)  # longest first, as fastai's SortedDL batches


class RecordedDropout:
  """Stands in for fastai's `dropout_mask` and torch's `F.dropout`: numpy draws, recorded."""

  def __init__(self, seed):
    self.rng, self.masks, self.torch_dropout = np.random.default_rng(seed), [], F.dropout

  def draw(self, shape, p):
    mask = (self.rng.random(tuple(shape)) >= p).astype(np.float32) / np.float32(1 - p)
    self.masks.append(mask)
    return torch.from_numpy(mask)

  def dropout_mask(self, x, sz, p):
    return self.draw(sz, p)

  def dropout(self, x, p=0.5, training=True, inplace=False):
    return x * self.draw(x.shape, p) if training and p > 0 else x


def per_chunk_layout(recorded, tokens):
  """The recorded draws in the tests' layout: encoder masks with a leading chunk axis (rows a
  chunk does not run get ones), then one mask per head block."""
  n_layers, (bs, sl) = CONFIG['n_layers'], tokens.shape
  sizes = [CONFIG['emb_sz']] + [CONFIG['n_hid']] * (n_layers - 1) + [CONFIG['emb_sz']]
  it = iter(recorded)
  enc = dict(embed=[], input=[], weight=[[] for _ in range(n_layers)], hidden=[[] for _ in range(n_layers - 1)])

  def rows(mask):
    full = np.ones((bs, *mask.shape[1:]), np.float32)
    full[:mask.shape[0]] = mask
    return full
  for _ in range(0, sl, SEQ_LEN):
    enc['embed'].append(next(it))
    enc['input'].append(rows(next(it)))
    for l in range(n_layers):
      enc['weight'][l].append(next(it))
      assert enc['weight'][l][-1].shape == (4 * sizes[l + 1], sizes[l + 1])
      if l < n_layers - 1:
        enc['hidden'][l].append(rows(next(it)))
  head = list(it)
  assert [m.shape for m in head] == [(bs, 3 * CONFIG['emb_sz']), (bs, LIN_FTRS[0])]
  out = {'masks/embed': np.stack(enc['embed']), 'masks/input': np.stack(enc['input'])}
  out |= {f'masks/weight/{l}': np.stack(w) for l, w in enumerate(enc['weight'])}
  out |= {f'masks/hidden/{l}': np.stack(h) for l, h in enumerate(enc['hidden'])}
  out |= {f'masks/head/{i}': m for i, m in enumerate(head)}
  return out


class Record(Callback):
  """After fastai's RNNRegularizer: keeps the batch's predictions, losses and gradients, then stops."""
  order = RNNRegularizer.order + 1

  def after_loss(self):
    self.seen = {'logits': self.learn.pred.detach().numpy(), 'loss': self.learn.loss.item(),
                 'loss_grad': self.learn.loss_grad.item()}

  def after_backward(self):
    self.seen |= {f'grad/{n}': p.grad.numpy().copy() for n, p in self.learn.model.named_parameters()}
    raise CancelFitException()


def padded_batch(n_tokens, seed):
  rng = np.random.default_rng(seed)
  docs = [torch.from_numpy(rng.integers(2, VOCAB, n)) for n in DOC_LENS]
  tokens = torch.stack([pad_chunk(d, pad_idx=CONFIG['pad_token'], seq_len=SEQ_LEN, pad_len=n_tokens) for d in docs])
  return tokens.numpy(), rng.integers(0, N_CLASS, len(DOC_LENS))


def main():
  torch.manual_seed(0)
  model = get_text_classifier(AWD_LSTM, VOCAB, N_CLASS, seq_len=SEQ_LEN, config=dict(CONFIG), drop_mult=1.0,
                              lin_ftrs=LIN_FTRS, ps=PS, max_len=MAX_LEN)
  with torch.no_grad():  # BatchNorm off its init, so every entry's conversion is exercised
    for block in model[1].layers:
      block[0].weight.uniform_(0.5, 1.5)
      block[0].bias.uniform_(-0.1, 0.1)
      block[0].running_mean.uniform_(-0.1, 0.1)
      block[0].running_var.uniform_(0.5, 1.5)
  out = {f'state_dict/{k}': v.numpy().copy() for k, v in model.state_dict().items()}
  names = {id(p): n for n, p in model.named_parameters()}
  split = [[names[id(p)] for p in group] for group in awd_lstm_clas_split(model)]
  # what wd_bn_bias=False spares; an LSTM's `bias` is its flag True, which fastai collects too
  wd_exempt = [names[id(p)] for p in norm_bias_params(model) if isinstance(p, torch.Tensor)]

  model.eval()
  for n_tokens in (25, 30):  # 30: the first chunk is padding in every row (fastai runs an empty batch)
    tokens, labels = padded_batch(n_tokens, seed=n_tokens)
    with torch.no_grad():
      out[f'eval/{n_tokens}/logits'] = model(torch.from_numpy(tokens))[0].numpy()
    out[f'eval/{n_tokens}/tokens'] = tokens

  tokens, labels = padded_batch(30, seed=1)
  items = [(torch.from_numpy(t), torch.tensor(int(y))) for t, y in zip(tokens, labels)]
  loader = DataLoader(items, bs=len(items), shuffle=False, drop_last=False)
  record, recorded = Record(), RecordedDropout(seed=2)
  learn = TextLearner(DataLoaders(loader, loader), model, loss_func=CrossEntropyLossFlat(),
                      splitter=awd_lstm_clas_split, cbs=[record])
  fastai_mask = awdlstm.dropout_mask
  awdlstm.dropout_mask, F.dropout = recorded.dropout_mask, recorded.dropout
  try:
    with learn.no_bar(), learn.no_logging():
      learn.fit(1, lr=1e-3)
  finally:
    awdlstm.dropout_mask, F.dropout = fastai_mask, recorded.torch_dropout
  out |= {'train/tokens': tokens, 'train/labels': labels} | {f'train/{k}': v for k, v in record.seen.items()}
  out |= {f'train/after/{k}': v.numpy().copy() for k, v in model.state_dict().items() if '.layers.' in k}
  out |= {f'train/{k}': v for k, v in per_chunk_layout(recorded.masks, tokens).items()}
  path = Path(__file__).with_name('fastai_classifier.npz')
  np.savez_compressed(path, config=json.dumps(dict(CONFIG, vocab=VOCAB, n_class=N_CLASS, seq_len=SEQ_LEN,
                                                   max_len=MAX_LEN, lin_ftrs=LIN_FTRS, ps=PS)),
                      split=json.dumps(split), wd_exempt=json.dumps(wd_exempt), **out)
  print(f'wrote {path} ({len(out)} arrays, {path.stat().st_size} bytes)')


if __name__ == '__main__':
  main()
