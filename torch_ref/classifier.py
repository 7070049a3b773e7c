"""PyTorch reference text classifier with fastai v2's semantics and state_dict keys.

Our own code, written from fastai's `SentenceEncoder`, `masked_concat_pool`,
`PoolingLinearClassifier` and `get_text_classifier` (REFERENCE.md): the state_dict keys
equal fastai's (`0.module.encoder.weight`, `0.module.rnns.0.weight_hh_l0_raw`,
`1.layers.0.0.weight`, `1.layers.0.2.weight`, ...), so fastai's state_dict loads here
strictly. As fastai does, each chunk runs only the rows whose text has started (the batch
sorted longest first) and the state is detached between chunks. The calling convention
adds explicit dropout masks: per chunk for the encoder (indexed to the rows that run), one
per head block.
"""
from __future__ import annotations

import torch
from torch import nn

from torch_ref.awd_lstm import AWD_LSTM

awd_lstm_clas_config = dict(emb_sz=400, n_hid=1152, n_layers=3, pad_token=1, bidir=False,
                            output_p=0.4, hidden_p=0.3, input_p=0.4, embed_p=0.05, weight_p=0.5)


def _resize_state(state, batch_size: int, module: AWD_LSTM):
  """fastai's `_change_hidden`: rows that join get a zero state, rows that leave are dropped."""
  if state is None:
    return module.zero_state(batch_size)
  zeros = module.zero_state(batch_size)
  return tuple(tuple(torch.cat([s[:batch_size], z[s.size(0):]]) for s, z in zip(layer, zero_layer))
               for layer, zero_layer in zip(state, zeros))


def _chunk_masks(masks, chunk: int, rows: int):
  """Chunk `chunk`'s masks with the per-row ones cut to the first `rows` rows."""
  if masks is None:
    return None
  return dict(embed=masks['embed'][chunk], input=masks['input'][chunk][:rows],
              weight=[w[chunk] for w in masks['weight']], hidden=[h[chunk][:rows] for h in masks['hidden']])


class SentenceEncoder(nn.Module):
  """fastai's SentenceEncoder; `forward(tokens, masks=None) -> (outputs (B, Lk, E), pad (B, Lk))`.

  `masks`: per-chunk encoder masks, each entry with a leading chunk axis (`embed` (C, V, 1),
  `input` (C, B, 1, E), `weight` [(C, 4H, H)], `hidden` [(C, B, 1, H)]).
  """

  def __init__(self, bptt: int, module: AWD_LSTM, pad_idx: int = 1, max_len: int | None = None):
    super().__init__()
    self.bptt, self.module, self.pad_idx, self.max_len = bptt, module, pad_idx, max_len

  def forward(self, tokens: torch.Tensor, masks=None):
    bs, sl = tokens.shape
    pad = tokens == self.pad_idx
    outs, kept, state = [], [], None
    for chunk, i in enumerate(range(0, sl, self.bptt)):
      real_bs = int((tokens[:, i] != self.pad_idx).sum())  # rows whose text has started
      if real_bs:  # fastai runs an empty batch here, which changes nothing
        state = _resize_state(state, real_bs, self.module)
        out, state = self.module(tokens[:real_bs, i:i + self.bptt], state, _chunk_masks(masks, chunk, real_bs))
        state = tuple(tuple(s.detach() for s in layer) for layer in state)
      else:
        out = self.module.encoder.weight.new_zeros(0, min(self.bptt, sl - i), self.module.encoder.weight.size(1))
      if self.max_len is None or sl - i <= self.max_len:
        outs.append(torch.cat([out, out.new_zeros(bs - out.size(0), *out.shape[1:])]))
        kept.append(pad[:, i:i + self.bptt])
    return torch.cat(outs, dim=1), torch.cat(kept, dim=1)


def masked_concat_pool(output: torch.Tensor, mask: torch.Tensor, bptt: int) -> torch.Tensor:
  """fastai's pooling: [output at the last real token, masked max, masked mean], (B, 3E).

  As fastai, the last real token is found from the pads in the last `bptt` columns.
  """
  lens = output.size(1) - mask.long().sum(dim=1)
  last_lens = mask[:, -bptt:].long().sum(dim=1)
  avg_pool = output.masked_fill(mask[:, :, None], 0).sum(dim=1) / lens.to(output.dtype)[:, None]
  max_pool = output.masked_fill(mask[:, :, None], -float('inf')).max(dim=1)[0]
  last = output[torch.arange(output.size(0)), -last_lens - 1]
  return torch.cat([last, max_pool, avg_pool], 1)


class LinBnDrop(nn.Sequential):
  """fastai's LinBnDrop as the head uses it: BatchNorm1d (weight 1, bias 1e-3), Dropout (only
  when p > 0, which shifts the Linear's index), Linear without bias, ReLU unless last."""

  def __init__(self, n_in: int, n_out: int, p: float, act: bool):
    bn = nn.BatchNorm1d(n_in)
    with torch.no_grad():
      bn.weight.fill_(1.0)
      bn.bias.fill_(1e-3)
    layers = [bn] + ([nn.Dropout(p)] if p != 0 else []) + [nn.Linear(n_in, n_out, bias=False)]
    super().__init__(*layers, *([nn.ReLU()] if act else []))

  def forward(self, x, mask=None):
    for layer in self:
      if isinstance(layer, nn.Dropout) and mask is not None and self.training:
        x = x * torch.as_tensor(mask, dtype=x.dtype)
      else:
        x = layer(x)
    return x


class PoolingLinearClassifier(nn.Module):
  """fastai's PoolingLinearClassifier: `forward((outputs, pad), masks=None) -> (logits, outputs, outputs)`."""

  def __init__(self, dims, ps, bptt: int):
    super().__init__()
    if len(ps) != len(dims) - 1:
      raise ValueError('Number of layers and dropout values do not match.')
    acts = [True] * (len(dims) - 2) + [False]
    self.layers = nn.Sequential(*[LinBnDrop(i, o, p, a) for i, o, p, a in zip(dims[:-1], dims[1:], ps, acts)])
    self.bptt = bptt

  def forward(self, encoded, masks=None):
    out, pad = encoded
    x = masked_concat_pool(out, pad, self.bptt)
    masks = [None] * len(self.layers) if masks is None else masks
    for layer, mask in zip(self.layers, masks):
      x = layer(x, mask)
    return x, out, out


class TextClassifier(nn.Sequential):
  """fastai's `get_text_classifier(AWD_LSTM, vocab_sz, n_class, seq_len, config, drop_mult,
  lin_ftrs, ps, pad_idx, max_len)` as `Sequential(SentenceEncoder, PoolingLinearClassifier)`.

  `forward(tokens, masks=None) -> (logits, outputs, outputs)` as fastai's (its RNNCallback
  reads the (B, Lk, E) encoder outputs for AR/TAR); `masks` = `{'encoder': per-chunk masks,
  'head': [one (B, n_in) mask per block]}`.
  """

  def __init__(self, vocab_sz: int, n_class: int, seq_len: int = 72, config: dict | None = None,
               drop_mult: float = 1.0, lin_ftrs=None, ps=None, pad_idx: int = 1, max_len: int | None = 72 * 20):
    config = {k: v * drop_mult if k.endswith('_p') else v for k, v in {**awd_lstm_clas_config, **(config or {})}.items()}
    lin_ftrs = [50] if lin_ftrs is None else list(lin_ftrs)
    ps = [0.1] * len(lin_ftrs) if ps is None else list(ps)
    dims = [config['emb_sz'] * 3] + lin_ftrs + [n_class]
    ps = [config.pop('output_p')] + ps
    encoder = SentenceEncoder(seq_len, AWD_LSTM(vocab_sz, **config), pad_idx=pad_idx, max_len=max_len)
    super().__init__(encoder, PoolingLinearClassifier(dims, ps, bptt=seq_len))

  def forward(self, tokens, masks=None):
    masks = masks or {}
    return self[1](self[0](tokens, masks.get('encoder')), masks.get('head'))
