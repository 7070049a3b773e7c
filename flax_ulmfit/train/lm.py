"""The language-model loss for `make_train_step` / `make_eval_step`: cross-entropy plus AR/TAR.

The model is any NNX module with the calling convention of `flax_ulmfit.models.LanguageModel`:
`model.encode(tokens, state, masks) -> (state, extras(raw, dropped))`, `model.output_layer()
-> (weight, bias)` and `model.sample_masks(key, batch_size)`; nothing here imports a model.
The decoder's matmul and the cross-entropy run fused (`linear_cross_entropy`), so the
(B, T, V) logits are never formed.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from flax_ulmfit.train.losses import ar_tar, linear_cross_entropy
from flax_ulmfit.train.step import check_ids


def lm_loss(model, batch, rng: jax.Array | None, carry, alpha: float = 2.0, beta: float = 1.0):
  """Loss of one batch of LM streams, and the recurrent state to carry to the next.

  Args:
    model: a language model in train mode (rng given) or eval mode (rng None).
    batch: `(x, y)` (B, T) input ids and next-token targets, or `(x, y, masks)` with every
      dropout mask given (`model.sample_masks`' layout), as the parity tests do.
    rng: draws this batch's dropout masks; None in evaluation.
    carry: recurrent state from the previous batch (None = zeros).
    alpha, beta: AR and TAR weights (fastai's TextLearner: 2 and 1), training only.

  Returns:
    `(loss, (new state with its gradient stopped, {'loss': cross_entropy}))`: the metric
    is the loss before AR/TAR, which is what fastai's Recorder logs as the training loss.
  """
  x, y = batch[:2]
  masks = batch[2] if len(batch) > 2 else None
  if masks is None and rng is not None:
    masks = model.sample_masks(rng, x.shape[0])
  state, extras = model.encode(x, carry, masks)
  cross_entropy = linear_cross_entropy(extras.dropped, *model.output_layer(), y)
  loss = cross_entropy if rng is None else cross_entropy + ar_tar(extras.raw, extras.dropped, alpha, beta)
  return loss, (jax.lax.stop_gradient(state), {'loss': cross_entropy})


def lm_batch_check(vocab_size: int) -> Callable[[Any], None]:
  """`check_batch` for the LM's train and eval steps: inputs and targets are ids in [0, vocab_size)."""
  def check(batch):
    check_ids(batch[0], vocab_size, 'lm batch: input ids')
    check_ids(batch[1], vocab_size, 'lm batch: target ids')
  return check
