"""Run by tests/test_distributed.py: the tiny AWD-LSTM LM trained by `fit` for 2 epochs of 3
batches (global batch 4, every dropout on, checkpoints), as one process of a job of
`--num-processes` joined through `cli.init_distributed` (CPU collectives: gloo). Each process
reads only its rows of every batch (`LMLoader(rows=parallel.process_rows(...))`).

  --interrupt: SIGTERM to itself in epoch 1, batch 1: `fit` saves a checkpoint and stops.
  --resume: continue from the newest checkpoint in --checkpoints.
Process 0 writes the final parameters and the step losses to --out (.npz).
"""
from __future__ import annotations

import argparse
import os
import signal

from flax_ulmfit import cli

parser = argparse.ArgumentParser()
cli.add_distributed_args(parser)
parser.add_argument('--checkpoints', required=True)
parser.add_argument('--out', required=True)
parser.add_argument('--interrupt', action='store_true')
parser.add_argument('--resume', action='store_true')
args = parser.parse_args()
cli.init_distributed(args.coordinator, args.num_processes, args.process_id)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from flax_ulmfit import parallel  # noqa: E402
from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config  # noqa: E402
from flax_ulmfit.text.data import LMLoader  # noqa: E402
from flax_ulmfit.train.checkpoints import TrainCheckpoints  # noqa: E402
from flax_ulmfit.train.lm import lm_loss  # noqa: E402
from flax_ulmfit.train.loop import Interrupted, fit  # noqa: E402
from flax_ulmfit.train.step import init_train_state, make_eval_step, make_train_step  # noqa: E402

BS, BPTT, VOCAB = 4, 5, 30


class Interrupting(LMLoader):
  """Signals SIGTERM to this process as it gives batch 1 of epoch 1 (as a job scheduler would)."""

  def batches(self, epoch, start=0):
    for b, batch in enumerate(super().batches(epoch, start), start):
      if args.interrupt and (epoch, b) == (1, 1):
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch


mesh = cli.device_mesh(1)  # one device per process here; None in a one-process job
rows = parallel.process_rows(BS, mesh)
docs = [np.random.default_rng(i).integers(0, VOCAB, 8).astype(np.int32) for i in range(8)]
train_dl = Interrupting(docs, BS, BPTT, seed=0, rows=rows)
valid_dl = LMLoader(docs[:4], BS, 2, shuffle=False, rows=rows)
model = LanguageModel(VOCAB, dict(awd_lstm_lm_config, emb_sz=8, n_hid=12, n_layers=2), drop_mult=1.0,
                      rngs=nnx.Rngs(0))
tx = optax.adam(1e-2)
state = init_train_state(model, tx)
if mesh is not None:
  state = parallel.replicate(state, mesh)


def zero_state(batch):
  carry = model.zero_state(batch[0].shape[0])  # this process's rows
  return parallel.shard_batch(carry, mesh) if mesh is not None else carry


try:
  state, history = fit(make_train_step(model, lm_loss, tx, mesh=mesh), state, train_dl, 2, rng=jax.random.key(0),
                       eval_step=make_eval_step(model, lm_loss, mesh=mesh), valid_data=valid_dl, init_carry=zero_state,
                       checkpoints=TrainCheckpoints(args.checkpoints), resume=args.resume, progress=False)
except Interrupted:
  pass
else:
  if jax.process_index() == 0:
    leaves = {jax.tree_util.keystr(p): np.asarray(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(
        (state.params, state.opt_state)) if np.issubdtype(leaf.dtype, np.number)}
    np.savez(args.out, valid_loss=[r['valid_loss'] for r in history], **leaves)
