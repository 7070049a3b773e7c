"""Transfer learning for XResNet: cut the body, attach a new head, load pretrained weights.

Freezing is the optimizer's job: parameter groups and `train.optim.fastai_optimizer(frozen=...)`.
"""
from __future__ import annotations

import jax
from flax import nnx

from flax_ulmfit.models.heads import Head, create_head
from flax_ulmfit.models.xresnet import XResNet, XResNetBody


class CNNModel(nnx.Module):
  """fastai's `create_cnn_model` result, Sequential(body, head): images -> body features -> head logits."""

  def __init__(self, body: XResNetBody, head: Head):
    self.body, self.head = body, head

  def __call__(self, x: jax.Array, *, dropout_masks=None) -> jax.Array:
    return self.head(self.body(x), dropout_masks=dropout_masks)


def create_cnn_model(model: XResNet, n_out: int, *, rngs: nnx.Rngs, **head_kwargs) -> CNNModel:
  """Cuts `model` before its pooling layer (fastai's cut=-4) and attaches `create_head(nf, n_out, **head_kwargs)`.

  The body is `model.body` itself (shared, as in fastai), carrying its trained weights.
  """
  return CNNModel(model.body, create_head(model.body.nf, n_out, rngs=rngs, **head_kwargs))


def load_pretrained_body(model: CNNModel, pretrained: XResNet) -> CNNModel:
  """Copies `pretrained.body`'s parameters and BatchNorm statistics into `model.body`; returns `model`."""
  want = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(model.body))
  got = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(pretrained.body))
  if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(want) != jax.tree.leaves(got):
    raise ValueError('load_pretrained_body: the pretrained body has a different architecture from the '
                     'model body (layers, widths or c_in differ); build both with the same xresnet preset '
                     'and c_in')
  nnx.update(model.body, nnx.state(pretrained.body))
  return model

