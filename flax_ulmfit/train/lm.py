"""The language-model loss for `make_train_step` / `make_eval_step`: cross-entropy plus AR/TAR.

The model is any NNX module with fastai's LM calling convention,
`model(tokens, state, masks) -> (logits, state, extras(raw, dropped))` and
`model.sample_masks(key, batch_size)`; nothing here imports a model.
"""
from __future__ import annotations

import jax

from flax_ulmfit.train.losses import ar_tar, cross_entropy_flat


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
    `(loss, (new state with its gradient stopped, {'cross_entropy': ...}))`.
  """
  x, y = batch[:2]
  masks = batch[2] if len(batch) > 2 else None
  if masks is None and rng is not None:
    masks = model.sample_masks(rng, x.shape[0])
  logits, state, extras = model(x, carry, masks)
  cross_entropy = cross_entropy_flat(logits, y)
  loss = cross_entropy if rng is None else cross_entropy + ar_tar(extras.raw, extras.dropped, alpha, beta)
  return loss, (jax.lax.stop_gradient(state), {'cross_entropy': cross_entropy})
