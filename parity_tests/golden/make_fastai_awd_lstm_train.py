"""Writes fastai_awd_lstm_train.npz: a fastai 2.8 AWD-LSTM language model in training mode, with
every dropout mask it draws replaced by a stored one, for test_fastai_awd_lstm_train.py.

fastai draws its masks in `awdlstm.dropout_mask` (embedding, input, hidden and output
dropout) and in `F.dropout` inside `WeightDropout`; both are swapped here for functions that
hand out numpy masks (Bernoulli(1-p)/(1-p), float32) in the order fastai asks for them, each
checked against the shape and p fastai requests. Recorded:
- a first batch (3 x 8 tokens) from a zero state, then a second with the state fastai carried
  (detached): logits, the last layer's raw and dropped outputs of both, and for the second
  the loss fastai backpropagates, `CrossEntropyLossFlat` plus fastai's own
  `RNNRegularizer(alpha=2, beta=1).after_loss`, and the gradient of every state_dict entry;
- a batch of one row after `reset()`: `RNNRegularizer` skips TAR there (its guard
  `len(h) > 1` is on the batch axis), so its loss is cross-entropy plus AR only.

Needs fastai (the scratch venv; the tests read only the .npz). From the repository root:
  PYTHONPATH=. $PY parity_tests/golden/make_fastai_awd_lstm_train.py
"""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.rnn import RNNRegularizer
from fastai.losses import CrossEntropyLossFlat
from fastai.text.models import awdlstm
from fastai.text.models.awdlstm import AWD_LSTM
from fastai.text.models.core import get_language_model

VOCAB = 37
CONFIG = dict(emb_sz=10, n_hid=14, n_layers=3, pad_token=1, bidir=False, output_p=0.3,
              hidden_p=0.3, input_p=0.3, embed_p=0.2, weight_p=0.4, tie_weights=True, out_bias=True)
SIZES = [CONFIG['emb_sz']] + [CONFIG['n_hid']] * (CONFIG['n_layers'] - 1) + [CONFIG['emb_sz']]


def draw_masks(batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One forward pass's masks, named as our `sample_masks` names them."""
  draw = lambda shape, p: ((rng.random(shape) >= p) / (1 - p)).astype(np.float32)  # noqa: E731
  masks = {'embed': draw((VOCAB, 1), CONFIG['embed_p']),
           'input': draw((batch_size, 1, CONFIG['emb_sz']), CONFIG['input_p'])}
  for l in range(CONFIG['n_layers']):
    masks[f'weight{l}'] = draw((4 * SIZES[l + 1], SIZES[l + 1]), CONFIG['weight_p'])
    if l < CONFIG['n_layers'] - 1:
      masks[f'hidden{l}'] = draw((batch_size, 1, SIZES[l + 1]), CONFIG['hidden_p'])
  masks['output'] = draw((batch_size, 1, CONFIG['emb_sz']), CONFIG['output_p'])
  return masks


class StoredMasks:
  """Stands in for fastai's mask draws: hands out `masks` in fastai's order of calls."""

  def __init__(self):
    self.queue = []

  def load(self, masks: dict[str, np.ndarray]) -> None:
    order = ['embed', 'input'] + [f'{kind}{l}' for l in range(CONFIG['n_layers']) for kind in ('weight', 'hidden')
                                  if f'{kind}{l}' in masks] + ['output']
    p = dict(embed=CONFIG['embed_p'], input=CONFIG['input_p'], weight=CONFIG['weight_p'],
             hidden=CONFIG['hidden_p'], output=CONFIG['output_p'])
    self.queue = [(name, masks[name], p[name.rstrip('0123456789')]) for name in order]

  def _next(self, shape, p: float) -> torch.Tensor:
    name, mask, expected_p = self.queue.pop(0)
    assert tuple(shape) == mask.shape and abs(p - expected_p) < 1e-12, (name, tuple(shape), p)
    return torch.from_numpy(mask)

  def dropout_mask(self, x, sz, p):  # fastai's awdlstm.dropout_mask
    return self._next(sz, p).to(x.dtype)

  def dropout(self, input, p=0.5, training=True, inplace=False):  # F.dropout inside WeightDropout
    assert training and not inplace
    return input * self._next(input.shape, p)


class FunctionalWithStoredDropout:
  """torch.nn.functional for awdlstm.py, with `dropout` replaced."""

  def __init__(self, stored: StoredMasks):
    self.dropout = stored.dropout

  def __getattr__(self, name):
    return getattr(F, name)


def fastai_loss(model, decoded, raw, dropped, targets):
  """What fastai's Learner backpropagates: the loss, then RNNRegularizer.after_loss adds AR/TAR."""
  loss = CrossEntropyLossFlat()(decoded, torch.from_numpy(targets))
  learn = SimpleNamespace(training=True, loss=loss, loss_grad=loss.clone(),
                          rnn=SimpleNamespace(raw_out=raw, out=dropped))
  regularizer = RNNRegularizer(alpha=2.0, beta=1.0)
  regularizer.learn = learn
  regularizer.after_loss()
  return learn.loss, learn.loss_grad


def main():
  stored = StoredMasks()
  awdlstm.dropout_mask = stored.dropout_mask
  awdlstm.F = FunctionalWithStoredDropout(stored)
  torch.manual_seed(0)
  model = get_language_model(AWD_LSTM, VOCAB, config=dict(CONFIG))
  with torch.no_grad():
    model[1].decoder.bias.uniform_(-0.1, 0.1)
  model.train()
  model.reset()
  rng = np.random.default_rng(0)
  ids = rng.integers(0, VOCAB, (3, 17)).astype(np.int64)
  ids[0, :3] = CONFIG['pad_token']
  out = dict(config=json.dumps(CONFIG), vocab=VOCAB, tokens=ids)
  out |= {f'state_dict/{k}': v.numpy().copy() for k, v in model.state_dict().items()}

  for name, cols in (('first', slice(0, 8)), ('second', slice(8, 16))):
    masks = draw_masks(3, rng)
    stored.load(masks)
    decoded, raw, dropped = model(torch.from_numpy(ids[:, cols]))
    assert not stored.queue
    out |= {f'{name}/masks/{k}': v for k, v in masks.items()}
    out |= {f'{name}/logits': decoded.detach().numpy(), f'{name}/raw': raw.detach().numpy(),
            f'{name}/dropped': dropped.detach().numpy()}
  targets = ids[:, 9:17]
  loss, loss_grad = fastai_loss(model, decoded, raw, dropped, targets)
  model.zero_grad()
  loss_grad.backward()
  params = dict(model.named_parameters(remove_duplicate=False))
  for key in model.state_dict():
    owner = params.get(key)
    if owner is None:  # `0.encoder_dp.emb.weight` is `0.encoder.weight` itself
      owner = params['0.encoder.weight']
    out[f'grad/{key}'] = owner.grad.numpy().copy()
  out |= {'second/cross_entropy': loss.item(), 'second/loss': loss_grad.item()}

  model.reset()
  single = rng.integers(0, VOCAB, (1, 9)).astype(np.int64)
  masks = draw_masks(1, rng)
  stored.load(masks)
  decoded, raw, dropped = model(torch.from_numpy(single[:, :8]))
  assert not stored.queue
  loss, loss_grad = fastai_loss(model, decoded, raw, dropped, single[:, 1:])
  out |= {f'single/masks/{k}': v for k, v in masks.items()}
  out |= {'single/tokens': single, 'single/cross_entropy': loss.item(), 'single/loss': loss_grad.item(),
          'single/ar': 2.0 * dropped.float().pow(2).mean().item()}
  path = Path(__file__).with_name('fastai_awd_lstm_train.npz')
  np.savez_compressed(path, **out)
  print(f'wrote {path}: loss of the second batch {out["second/loss"]:.6f} (cross-entropy {out["second/cross_entropy"]:.6f}); '
        f'one-row loss {out["single/loss"]:.6f} = cross-entropy + AR {out["single/ar"]:.6f}')


if __name__ == '__main__':
  main()
