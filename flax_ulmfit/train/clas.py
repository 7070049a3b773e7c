"""The text-classifier loss for `make_train_step` / `make_eval_step`: fastai's flat cross-entropy
plus, in training, the AR/TAR that fastai's `TextLearner` adds to a classifier too.

The model is any NNX module with the calling convention of
`flax_ulmfit.models.TextClassifier`: `model.classify(tokens, masks, key=...) -> (logits,
outputs)`, `outputs` the (B, Lk, E) encoder outputs; nothing here imports a model.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_ulmfit.text.labels import PAD_LABEL
from flax_ulmfit.train.losses import ar_tar, cross_entropy, kept_mean
from flax_ulmfit.train.step import check_ids


def clas_loss(model, batch, rng: jax.Array | None, carry=None, alpha: float = 2.0, beta: float = 1.0):
  """Loss of one classifier batch.

  fastai's `text_classifier_learner` trains on `CrossEntropyLossFlat` plus its RNNRegularizer
  (alpha 2, beta 1) applied to the classifier's encoder outputs: `alpha * mean(out**2) +
  beta * mean((out[:, 1:] - out[:, :-1])**2)` over the kept window, padding included.

  Args:
    model: a text classifier in train mode (rng given) or eval mode (rng None).
    batch: `(x, y)` (B, L) padded ids and (B,) labels, or `(x, y, masks)` with the dropout masks
      (`model.sample_masks`' layout), as the parity tests do.
    rng: draws this batch's dropout masks (chunk by chunk, inside the model); None in evaluation.
    carry: unused (each text starts from a zero state); returned as None.
    alpha, beta: AR and TAR weights, training only.

  Returns:
    `(loss, (None, {'loss', 'accuracy', 'count'}))`: the `loss` metric is the cross-entropy
    before AR/TAR (what fastai's Recorder logs), `count` the rows that count (rows labelled
    `PAD_LABEL`, `ClasLoader(pad_last=True)`'s padding, are skipped), so `fit` averages
    over uneven batches exactly. Labels outside [0, n_class) raise on concrete arrays and make
    the loss NaN inside `jit` (never a silently wrapped label); check them on the host with
    `clas_batch_check`.
  """
  del carry
  x, y = batch[:2]
  masks = batch[2] if len(batch) > 2 else None
  if y.shape != x.shape[:1]:
    raise ValueError(f'clas_loss: got tokens of shape {x.shape} and labels of shape {y.shape}; '
                     'expected (B, L) tokens and (B,) labels')
  logits, outputs = model.classify(x, masks, key=rng)
  n_class = logits.shape[-1]
  if not isinstance(y, jax.core.Tracer):
    _check_labels(y, n_class, 'clas_loss: labels')
  keep = y != PAD_LABEL
  in_range = jnp.all(~keep | ((y >= 0) & (y < n_class)))
  y = jnp.where(keep, y, 0)
  cross_entropy_ = jnp.where(in_range, kept_mean(cross_entropy(logits, y, 'none'), keep), jnp.nan)
  loss = cross_entropy_ if rng is None else cross_entropy_ + ar_tar(outputs, outputs, alpha, beta)
  metrics = {'loss': cross_entropy_, 'accuracy': kept_mean(jnp.argmax(logits, -1) == y, keep),
             'count': keep.sum().astype(jnp.float32)}
  return loss, (None, metrics)


def _check_labels(y, n_class: int, what: str) -> None:
  """Raises unless every label is a class id or `PAD_LABEL` (padding rows)."""
  y = np.asarray(y)
  check_ids(y[y != PAD_LABEL], n_class, what)


def clas_batch_check(model) -> Callable[[Any], None]:
  """`check_batch` for the classifier's train and eval steps: token ids of the model's
  vocabulary padded as `ClasLoader` pads them (`model.check_input`), labels in [0, n_class)."""
  def check(batch):
    model.check_input(batch[0])
    _check_labels(batch[1], model.n_class, 'clas batch: labels')
  return check
