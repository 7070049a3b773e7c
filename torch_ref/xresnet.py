"""Reference XResNet and transfer head in PyTorch, laid out like fastai's so state_dicts match.

fastai.vision.models.xresnet / fastai.layers semantics: ConvLayer is Sequential(conv, bn[, act]),
ResBlock has `convpath`, `idpath`, `act`, XResNet is a Sequential (stem, max-pool, stages,
avg-pool, flatten, dropout, linear), `create_head` and `create_cnn_model` build the transfer
model Sequential(body, head).
"""
from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Dropout):
  """nn.Dropout that multiplies by `self.mask` (already scaled by 1/(1-p)) when one is set."""

  mask: torch.Tensor | None = None

  def forward(self, x):
    if self.training and self.mask is not None:
      return x * self.mask
    return super().forward(x)


class ConvLayer(nn.Sequential):
  """conv (no bias, padding (ks-1)//2) -> BatchNorm2d (bias 0, weight 1 or 0) -> optional ReLU."""

  def __init__(self, ni, nf, ks=3, stride=1, act=True, bn_zero=False):
    bn = nn.BatchNorm2d(nf)
    nn.init.constant_(bn.weight, 0.0 if bn_zero else 1.0)
    layers = [nn.Conv2d(ni, nf, ks, stride=stride, padding=(ks - 1) // 2, bias=False), bn]
    super().__init__(*layers, nn.ReLU(inplace=True)) if act else super().__init__(*layers)


class ResBlock(nn.Module):
  """relu(convpath(x) + idpath(x)); idpath = [AvgPool2d(2, ceil_mode=True)] [+ 1x1 ConvLayer]."""

  def __init__(self, expansion, ni, nf, stride=1):
    super().__init__()
    ni, nf = ni * expansion, nf * expansion
    mid = nf // expansion
    if expansion == 1:
      convs = [ConvLayer(ni, mid, 3, stride), ConvLayer(mid, nf, 3, act=False, bn_zero=True)]
    else:
      convs = [ConvLayer(ni, mid, 1), ConvLayer(mid, mid, 3, stride), ConvLayer(mid, nf, 1, act=False, bn_zero=True)]
    self.convpath = nn.Sequential(*convs)
    idpath = [nn.AvgPool2d(2, ceil_mode=True)] if stride != 1 else []
    if ni != nf:
      idpath.append(ConvLayer(ni, nf, 1, act=False))
    self.idpath = nn.Sequential(*idpath)
    self.act = nn.ReLU(inplace=True)

  def forward(self, x):
    return self.act(self.convpath(x) + self.idpath(x))


def init_cnn(m: nn.Module) -> None:
  """fastai's init_cnn: kaiming_normal_ for conv/linear weights, every bias zero."""
  if getattr(m, 'bias', None) is not None:
    nn.init.constant_(m.bias, 0)
  if isinstance(m, (nn.Conv2d, nn.Linear)):
    nn.init.kaiming_normal_(m.weight)
  for child in m.children():
    init_cnn(child)


class XResNet(nn.Sequential):
  """fastai's XResNet(ResBlock, expansion, layers, p, c_in, n_out, stem_szs, widen)."""

  def __init__(self, expansion, layers, p=0.0, c_in=3, n_out=1000, stem_szs=(32, 32, 64), widen=1.0):
    szs = [c_in, *stem_szs]
    stem = [ConvLayer(szs[i], szs[i + 1], 3, 2 if i == 0 else 1) for i in range(len(stem_szs))]
    widths = [64 // expansion] + [int(w * widen) for w in [64, 128, 256, 512] + [256] * (len(layers) - 4)]
    widths = widths[:len(layers) + 1]  # fastai keeps all five, breaking the head when len(layers) < 4
    stages = [nn.Sequential(*[ResBlock(expansion, widths[i] if b == 0 else widths[i + 1], widths[i + 1],
                                       (1 if i == 0 else 2) if b == 0 else 1) for b in range(n)])
              for i, n in enumerate(layers)]
    super().__init__(*stem, nn.MaxPool2d(3, 2, 1), *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                     Dropout(p), nn.Linear(widths[-1] * expansion, n_out))
    init_cnn(self)


def xresnet18(c_in=3, n_out=1000, p=0.0):
  return XResNet(1, [2, 2, 2, 2], p, c_in, n_out)


def xresnet34(c_in=3, n_out=1000, p=0.0):
  return XResNet(1, [3, 4, 6, 3], p, c_in, n_out)


def xresnet50(c_in=3, n_out=1000, p=0.0):
  return XResNet(4, [3, 4, 6, 3], p, c_in, n_out)


def xresnet101(c_in=3, n_out=1000, p=0.0):
  return XResNet(4, [3, 4, 23, 3], p, c_in, n_out)


def xresnet152(c_in=3, n_out=1000, p=0.0):
  return XResNet(4, [3, 8, 36, 3], p, c_in, n_out)


class AdaptiveConcatPool2d(nn.Module):
  """cat([AdaptiveMaxPool2d(1), AdaptiveAvgPool2d(1)], dim=1), as fastai."""

  def __init__(self):
    super().__init__()
    self.ap, self.mp = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)

  def forward(self, x):
    return torch.cat([self.mp(x), self.ap(x)], 1)


def create_head(nf, n_out, lin_ftrs=None, ps=0.5, concat_pool=True, first_bn=True):
  """fastai's create_head: pool, flatten, then LinBnDrop blocks [BatchNorm1d, Dropout, Linear(bias=not bn), ReLU]."""
  if concat_pool:
    nf *= 2
  ftrs = [nf, 512, n_out] if lin_ftrs is None else [nf, *lin_ftrs, n_out]
  ps = list(ps) if isinstance(ps, (list, tuple)) else [ps]
  if len(ps) == 1:
    ps = [ps[0] / 2] * (len(ftrs) - 2) + ps
  layers = [AdaptiveConcatPool2d() if concat_pool else nn.AdaptiveAvgPool2d(1), nn.Flatten()]
  for i, (ni, no, p) in enumerate(zip(ftrs[:-1], ftrs[1:], ps)):
    if first_bn or i > 0:
      bn = nn.BatchNorm1d(ni)
      nn.init.constant_(bn.bias, 1e-3)  # fastai's BatchNorm(ndim=1): weight 1, bias 1e-3
      layers.append(bn)
    if p != 0:
      layers.append(Dropout(p))
    layers.append(nn.Linear(ni, no, bias=not (first_bn or i > 0)))
    if i < len(ftrs) - 2:
      layers.append(nn.ReLU(inplace=True))
  head = nn.Sequential(*layers)
  for m in head.modules():  # fastai's apply_init: kaiming_normal_ on non-BatchNorm weights, bias 0
    if isinstance(m, nn.Linear):
      nn.init.kaiming_normal_(m.weight)
      if m.bias is not None:
        nn.init.zeros_(m.bias)
  return head


def create_cnn_model(model: XResNet, n_out, **head_kwargs):
  """Sequential(body, head): `model` cut before its pooling layer (fastai's cut=-4), then create_head."""
  body = nn.Sequential(*list(model.children())[:-4])
  return nn.Sequential(body, create_head(model[-1].in_features, n_out, **head_kwargs))
