"""PyTorch reference AWD-LSTM language model with fastai v2's semantics and parameter names.

Our own code, written from fastai's documented behaviour (REFERENCE.md): the state_dict keys
equal those of fastai's `get_language_model(AWD_LSTM, ...)`, so a fastai state_dict loads
here with `strict=True` and back. Differences from fastai, all in the calling convention:
the recurrent state is passed in and returned (not stored on the module), and every dropout
site takes an optional explicit mask so tests can hand both frameworks the same masks.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

awd_lstm_lm_config = dict(emb_sz=400, n_hid=1152, n_layers=3, pad_token=1, bidir=False,
                          output_p=0.1, hidden_p=0.15, input_p=0.25, embed_p=0.02,
                          weight_p=0.2, tie_weights=True, out_bias=True)


def dropout_mask(like: torch.Tensor, shape, p: float) -> torch.Tensor:
  """Bernoulli(1 - p) / (1 - p) of `shape`, on `like`'s device and dtype."""
  return like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)


def _as_mask(mask, like: torch.Tensor) -> torch.Tensor:
  return torch.as_tensor(mask, dtype=like.dtype, device=like.device)


class RNNDropout(nn.Module):
  """Variational dropout: a (B, 1, F) mask shared over time."""

  def __init__(self, p: float = 0.5):
    super().__init__()
    self.p = p

  def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
    if not self.training or self.p == 0.0:
      return x
    mask = dropout_mask(x, (x.size(0), 1, x.size(2)), self.p) if mask is None else _as_mask(mask, x)
    return x * mask


class EmbeddingDropout(nn.Module):
  """Drops whole embedding rows; keeps the wrapped embedding's padding index (no pad gradient)."""

  def __init__(self, emb: nn.Embedding, embed_p: float):
    super().__init__()
    self.emb, self.embed_p = emb, embed_p

  def forward(self, words: torch.Tensor, mask=None) -> torch.Tensor:
    weight = self.emb.weight
    if self.training and self.embed_p != 0.0:
      mask = dropout_mask(weight, (weight.size(0), 1), self.embed_p) if mask is None else _as_mask(mask, weight)
      weight = weight * mask
    return F.embedding(words, weight, self.emb.padding_idx)


class WeightDropout(nn.Module):
  """DropConnect on an `nn.LSTM`'s `weight_hh_l0`: the trainable tensor is `weight_hh_l0_raw`;
  each forward writes the dropped copy into the LSTM (torch's RNN `__setattr__` refreshes
  its flat weights), so the gradient reaches the raw weight."""

  def __init__(self, module: nn.LSTM, weight_p: float):
    super().__init__()
    self.module, self.weight_p = module, weight_p
    raw = module.weight_hh_l0
    self.register_parameter('weight_hh_l0_raw', nn.Parameter(raw.detach().clone()))
    del module._parameters['weight_hh_l0']
    setattr(module, 'weight_hh_l0', raw.detach().clone())

  def forward(self, x, state, mask=None):
    raw = self.weight_hh_l0_raw
    if self.training and self.weight_p != 0.0:
      mask = dropout_mask(raw, raw.shape, self.weight_p) if mask is None else _as_mask(mask, raw)
      weight = raw * mask
    else:
      weight = raw * 1.0  # a fresh tensor, so the LSTM never aliases the parameter
    setattr(self.module, 'weight_hh_l0', weight)
    return self.module(x, state)


class AWD_LSTM(nn.Module):
  """fastai's AWD_LSTM encoder; `forward(tokens, state=None, masks=None) -> (output, state)`."""

  def __init__(self, vocab_sz, emb_sz, n_hid, n_layers, pad_token=1, hidden_p=0.2, input_p=0.6,
               embed_p=0.1, weight_p=0.5, bidir=False):
    super().__init__()
    assert not bidir, 'bidir is not supported'
    self.n_layers, self.pad_token = n_layers, pad_token
    self.encoder = nn.Embedding(vocab_sz, emb_sz, padding_idx=pad_token)
    self.encoder_dp = EmbeddingDropout(self.encoder, embed_p)
    sizes = [emb_sz] + [n_hid] * (n_layers - 1) + [emb_sz]
    self.rnns = nn.ModuleList([WeightDropout(nn.LSTM(sizes[l], sizes[l + 1], batch_first=True), weight_p)
                               for l in range(n_layers)])
    self.encoder.weight.data.uniform_(-0.1, 0.1)
    self.input_dp = RNNDropout(input_p)
    self.hidden_dps = nn.ModuleList([RNNDropout(hidden_p) for _ in range(n_layers)])
    self.sizes = sizes

  def zero_state(self, batch_size: int):
    like = self.encoder.weight
    return tuple((like.new_zeros(batch_size, s), like.new_zeros(batch_size, s)) for s in self.sizes[1:])

  def forward(self, tokens, state=None, masks=None):
    masks = masks or {}
    state = self.zero_state(tokens.size(0)) if state is None else state
    weight_masks = masks.get('weight') or [None] * self.n_layers
    hidden_masks = masks.get('hidden') or [None] * (self.n_layers - 1)
    x = self.input_dp(self.encoder_dp(tokens, masks.get('embed')), masks.get('input'))
    new_state = []
    for l, rnn in enumerate(self.rnns):
      h, c = state[l]
      x, (h, c) = rnn(x, (h[None], c[None]), weight_masks[l])
      new_state.append((h[0], c[0]))
      if l < self.n_layers - 1:
        x = self.hidden_dps[l](x, hidden_masks[l])
    return x, tuple(new_state)


class LinearDecoder(nn.Module):
  """fastai's LinearDecoder: output dropout then linear; returns (logits, raw input, dropped)."""

  def __init__(self, n_out, n_hid, output_p=0.1, tie_encoder: nn.Embedding | None = None, bias=True):
    super().__init__()
    self.decoder = nn.Linear(n_hid, n_out, bias=bias)
    self.decoder.weight.data.uniform_(-0.1, 0.1)
    self.output_dp = RNNDropout(output_p)
    if bias:
      self.decoder.bias.data.zero_()
    if tie_encoder is not None:
      self.decoder.weight = tie_encoder.weight

  def forward(self, x, mask=None):
    dropped = self.output_dp(x, mask)
    return self.decoder(dropped), x, dropped


class LanguageModel(nn.Sequential):
  """fastai's `get_language_model(AWD_LSTM, vocab_sz, config, drop_mult)` as `Sequential(encoder,
  decoder)`, so parameter names match (`0.encoder.weight`, `1.decoder.bias`, ...).

  `forward(tokens, state=None, masks=None) -> (logits, state, (raw, dropped))`.
  """

  def __init__(self, vocab_sz: int, config: dict | None = None, drop_mult: float = 1.0):
    config = {k: v * drop_mult if k.endswith('_p') else v
              for k, v in (awd_lstm_lm_config if config is None else config).items()}
    output_p = config.pop('output_p')
    tie_weights = config.pop('tie_weights')
    out_bias = config.pop('out_bias')
    encoder = AWD_LSTM(vocab_sz, **config)
    decoder = LinearDecoder(vocab_sz, config['emb_sz'], output_p,
                            tie_encoder=encoder.encoder if tie_weights else None, bias=out_bias)
    super().__init__(encoder, decoder)

  def forward(self, tokens, state=None, masks=None):
    masks = masks or {}
    raw, state = self[0](tokens, state, masks)
    logits, raw, dropped = self[1](raw, masks.get('output'))
    return logits, state, (raw, dropped)
