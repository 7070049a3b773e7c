"""Plants realistic bugs one at a time in a scratch copy of the repository and runs the tests
that should catch each, up to the first failure: the record behind the bug table in
docs/parity.md.

  PYTHONPATH=. python -m parity_tests.planted_bugs            # every bug, a markdown table
  PYTHONPATH=. python -m parity_tests.planted_bugs loader_bl  # the named ones only

The working tree is never touched: each bug is an exact text replacement applied to a copy
(which the run deletes), so an interrupted run leaves nothing planted.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Bug(NamedTuple):
  name: str
  area: str
  what: str    # the mistake, as a reviewer would describe it
  path: str    # file it is planted in
  old: str     # exact text replaced (must occur once)
  new: str
  tests: tuple[str, ...]  # pytest targets run against it


AWD = ('tests/test_awd_lstm.py', 'parity_tests/test_awd_lstm_parity.py', 'parity_tests/test_fastai_awd_lstm_train.py',
       'parity_tests/test_fastai_golden.py', 'parity_tests/test_train_lm_trajectory.py')
LOSSES = ('tests/test_train_pieces.py', 'parity_tests/test_train_losses.py', 'parity_tests/test_fastai_awd_lstm_train.py')
OPTIM = ('tests/test_train_pieces.py', 'parity_tests/test_train_optim.py', 'parity_tests/test_train_schedules.py',
         'parity_tests/test_fastai_learner.py', 'parity_tests/test_train_lm_trajectory.py')
SCALER = ('tests/test_train_pieces.py', 'parity_tests/test_train_precision.py')
LOADERS = ('tests/test_text_data.py', 'parity_tests/test_fastai_lm_loader.py')
TEXT = ('tests/test_text_tokenize.py', 'tests/test_text_vocab.py', 'tests/test_text_corpora.py')
XRESNET = ('tests/test_xresnet.py', 'parity_tests/test_xresnet_parity.py', 'parity_tests/test_fastai_xresnet.py')
# fastai's golden first: the quickest to fail, and the table's last column reads off it.
CLAS = ('parity_tests/test_fastai_classifier.py', 'tests/test_classifier.py', 'parity_tests/test_classifier_parity.py')
RECIPE = ('parity_tests/test_fastai_classifier.py::test_groups_and_weight_decay_exemption_equal_fastai', 'tests/test_ulmfit.py',
          'parity_tests/test_classifier_parity.py')

BUGS = [
    # models: AWD-LSTM
    Bug('weight_mask_unscaled', 'models', 'sample_masks: weight-dropout masks a plain Bernoulli draw, not scaled by 1/(1-p)',
        'flax_ulmfit/models/awd_lstm.py',
        "weight=[dp.draw(rnn.weight_hh.shape, k) for dp, rnn, k in zip(self.weight_dps, self.rnns, keys['weight'])],",
        'weight=[jax.random.bernoulli(k, 1 - dp.p, rnn.weight_hh.shape).astype(jnp.float32) '
        "for dp, rnn, k in zip(self.weight_dps, self.rnns, keys['weight'])],", AWD),
    Bug('weight_site_unscaled', 'models', 'WeightDropout drawing on demand: a plain Bernoulli mask, not scaled',
        'flax_ulmfit/models/dropout.py', 'return drop_weight(weight, self.key_or_fresh(key), self.p)',
        'return weight * jax.random.bernoulli(self.key_or_fresh(key), 1 - self.p, weight.shape)', AWD),
    Bug('weight_mask_one_key', 'models', "sample_masks: one key for every layer's weight mask",
        'flax_ulmfit/models/awd_lstm.py', 'weight=list(jax.random.split(k_weight, self.n_layers))',
        'weight=[k_weight] * self.n_layers', AWD),
    Bug('embed_mask_columns', 'models', 'EmbeddingDropout drops embedding columns (1, E) instead of word rows (V, 1)',
        'flax_ulmfit/models/dropout.py', 'shape = (weight.shape[0], 1)', 'shape = (1, weight.shape[1])', AWD),
    Bug('pad_gradient', 'models', 'the padding row of the embedding receives gradient',
        'flax_ulmfit/models/awd_lstm.py', 'jnp.where(is_pad, jax.lax.stop_gradient(vectors), vectors)', 'vectors', AWD),
    Bug('no_output_dropout', 'models', "the decoder's input skips output dropout",
        'flax_ulmfit/models/awd_lstm.py', 'LMExtras(raw, self.decoder.drop(raw, (masks or {}).get(\'output\')))',
        'LMExtras(raw, raw)', AWD),
    Bug('gate_order', 'models', 'LSTM gates read in TensorFlow-like order i, f, o, g instead of torch\'s i, f, g, o',
        'flax_ulmfit/models/lstm.py', '  i, f, g, o = jnp.split(z, 4, axis=0)\n  return', '  i, f, o, g = jnp.split(z, 4, axis=0)\n  return',
        AWD),
    Bug('drop_mult_skips_output', 'models', '`drop_mult` not applied to output_p',
        'flax_ulmfit/models/awd_lstm.py', "v * drop_mult if k.endswith('_p') else v",
        "v * drop_mult if k.endswith('_p') and k != 'output_p' else v", AWD),
    # models: XResNet
    Bug('bn_biased_var', 'models', 'BatchNorm running var updated with the biased batch variance',
        'flax_ulmfit/models/batchnorm.py', ' * (n / max(n - 1, 1))', '', XRESNET),
    Bug('no_zero_bn', 'models', "XResNet: the last BatchNorm of each conv path starts at 1, not fastai's 0",
        'flax_ulmfit/models/xresnet.py', 'scale_init=0.0 if bn_zero else 1.0', 'scale_init=1.0', XRESNET),
    Bug('avg_pool_count', 'models', "AvgPool2d(2, ceil_mode=True): odd edges divided by 4, not by the cells inside",
        'flax_ulmfit/models/conv.py', 'return summed / jnp.asarray(counts, x.dtype)[None, :, :, None]',
        'return summed / 4', XRESNET),
    Bug('kernel_hw_swap', 'interop', 'torch -> Flax conv kernels transposed with H and W swapped',
        'flax_ulmfit/interop/xresnet.py', 'array = array.transpose(2, 3, 1, 0)', 'array = array.transpose(3, 2, 1, 0)',
        XRESNET),
    # models: text classifier
    Bug('clas_pool_order', 'classifier', 'masked concat pooling ordered [max, mean, last] (fastai: [last, max, mean])',
        'flax_ulmfit/models/classifier.py', 'jnp.concatenate([last_out, max_pool, avg_pool], axis=1)',
        'jnp.concatenate([max_pool, avg_pool, last_out], axis=1)', CLAS),
    Bug('clas_mean_window', 'classifier', "mean pooling divides by the window's length, not the real tokens",
        'flax_ulmfit/models/classifier.py', '.sum(1) / real.sum(1, keepdims=True).astype(outputs.dtype)',
        '.sum(1) / n_tokens', CLAS),
    Bug('clas_last_window_end', 'classifier', "'last' pooling takes the window's last position, not the last real token",
        'flax_ulmfit/models/classifier.py', 'last = n_tokens - 1 - jnp.argmax(real[:, ::-1], axis=1)',
        'last = jnp.full(pad.shape[:1], n_tokens - 1)', CLAS),
    Bug('clas_max_over_padding', 'classifier', 'max pooling includes the padded positions',
        'flax_ulmfit/models/classifier.py', 'max_pool = jnp.where(pad[..., None], -jnp.inf, outputs).max(1)',
        'max_pool = outputs.max(1)', CLAS),
    Bug('clas_state_not_reset', 'classifier', 'a row that starts late carries the state its padding built (not zero)',
        'flax_ulmfit/models/classifier.py',
        '    state = jax.tree.map(lambda a: jnp.where(started[:, None], a, 0.0), state)  # new rows start at zero\n',
        '', CLAS),
    Bug('clas_unstarted_outputs', 'classifier', 'encoder outputs of rows not yet started are kept (fastai: zeros, read by AR/TAR)',
        'flax_ulmfit/models/classifier.py', 'return jnp.where(active[:, None, None], out, 0.0), state',
        'return out, state', CLAS),
    Bug('clas_grad_across_chunks', 'classifier', 'the state passed between chunks is not detached (gradient crosses chunks)',
        'flax_ulmfit/models/classifier.py', 'return (jax.lax.stop_gradient(state), active), out',
        'return (state, active), out', CLAS),
    Bug('clas_window_all_chunks', 'classifier', 'chunks before the last max_len tokens are pooled too',
        'flax_ulmfit/models/classifier.py',
        'kept = n_chunks if self.max_len is None else min(n_chunks, self.max_len // self.seq_len)',
        'kept = n_chunks', CLAS),
    Bug('clas_scan_one_key', 'classifier', 'masks drawn inside the scan: the same key (same masks) for every chunk',
        'flax_ulmfit/models/classifier.py', 'per_chunk = jax.random.split(key, n_before + n_kept)',
        'per_chunk = jnp.stack([key] * (n_before + n_kept))', CLAS),
    Bug('clas_sample_masks_one_key', 'classifier', 'SentenceEncoder.sample_masks: the same masks for every chunk',
        'flax_ulmfit/models/classifier.py', '(jax.random.split(key, n_chunks))', '(jnp.stack([key] * n_chunks))', CLAS),
    Bug('clas_head_one_key', 'classifier', "the head's blocks draw their dropout masks from one key",
        'flax_ulmfit/models/classifier.py', 'keys = jax.random.split(key, len(self.layers))',
        'keys = [key] * len(self.layers)', CLAS),
    Bug('clas_head_ps_drop_mult', 'classifier', "drop_mult also scales the head's 0.1 dropout (fastai: only the config's)",
        'flax_ulmfit/models/classifier.py', 'ps = [0.1] * len(lin_ftrs) if ps is None',
        'ps = [0.1 * drop_mult] * len(lin_ftrs) if ps is None', CLAS),
    Bug('clas_relu_after_last', 'classifier', 'a ReLU after the last linear layer too (logits never negative)',
        'flax_ulmfit/models/classifier.py', '      if i < len(self.layers) - 1:\n        x = jax.nn.relu(x)',
        '      x = jax.nn.relu(x)', CLAS),
    Bug('clas_bn_momentum', 'classifier', "the head's BatchNorm with momentum 0.9 (Flax's convention read as torch's 0.1)",
        'flax_ulmfit/models/heads.py', 'self.bn = BatchNorm(n_in) if bn else None',
        'self.bn = BatchNorm(n_in, momentum=0.9) if bn else None', CLAS),
    Bug('clas_bn_eps', 'classifier', "the head's BatchNorm with eps 1e-3 (Keras's) instead of torch's 1e-5",
        'flax_ulmfit/models/heads.py', 'self.bn = BatchNorm(n_in) if bn else None',
        'self.bn = BatchNorm(n_in, epsilon=1e-3) if bn else None', CLAS),
    Bug('clas_loss_records_ar_tar', 'classifier', "clas_loss records the loss after AR/TAR (fastai's Recorder: before)",
        'flax_ulmfit/train/clas.py', "metrics = {'loss': cross_entropy_,", "metrics = {'loss': loss,", CLAS),
    Bug('clas_ar_tar_in_eval', 'classifier', 'clas_loss adds AR/TAR in evaluation too',
        'flax_ulmfit/train/clas.py', 'loss = cross_entropy_ if rng is None else cross_entropy_ + ar_tar(',
        'loss = cross_entropy_ + ar_tar(', CLAS),
    Bug('clas_split_lm_order', 'classifier', "awd_lstm_clas_split orders the groups as the LM's (RNNs, embedding, head)",
        'flax_ulmfit/ulmfit.py', "return Split(('embeds',) + rnns + ('head',),", "return Split(rnns + ('embeds', 'head'),",
        RECIPE),
    Bug('clas_interop_p0_index', 'interop', "classifier state_dict: the head's Linear at index 2 even where p = 0 (fastai: 1)",
        'flax_ulmfit/interop/classifier.py', '{2 if block.dropout.rate != 0 else 1}', '{2}', CLAS),
    Bug('clas_interop_prefix', 'interop', "classifier state_dict: encoder keys under '0.' instead of fastai's '0.module.'",
        'flax_ulmfit/interop/classifier.py', "_ENCODER = '0.module.'", "_ENCODER = '0.'", CLAS),
    Bug('load_encoder_whole_lm', 'interop', "load_encoder recognises only a classifier's prefix, so a whole LM state_dict "
        "fails without naming the fix", 'flax_ulmfit/interop/classifier.py', "key.startswith(('0.', '1.'))",
        "key.startswith('0.module.')", CLAS),
    Bug('clas_window_off_by_one', 'classifier', "keeps the chunks with `L - i < max_len` (fastai: `<=`): one chunk too few",
        'flax_ulmfit/models/classifier.py', 'min(n_chunks, self.max_len // self.seq_len)',
        'min(n_chunks, self.max_len // self.seq_len - 1)', CLAS),
    Bug('clas_last_off_by_one', 'classifier', "fastai's `-last_lens-1` read as `-last_lens`: 'last' pooling one past the text",
        'flax_ulmfit/models/classifier.py', 'last = n_tokens - 1 - jnp.argmax(real[:, ::-1], axis=1)',
        'last = n_tokens - jnp.argmax(real[:, ::-1], axis=1)', CLAS),
    Bug('clas_state_not_carried', 'classifier', "every chunk starts from a zero state (fastai's detached state read as reset)",
        'flax_ulmfit/models/classifier.py', 'return (jax.lax.stop_gradient(state), active), out',
        'return (jax.tree.map(jnp.zeros_like, state), active), out', CLAS),
    Bug('clas_window_state_dropped', 'classifier', 'the chunks before the window run, but the window starts from a zero state',
        'flax_ulmfit/models/classifier.py', 'carry, _ = jax.lax.scan(lambda c, x: (step(frozen, c, x)[0], None), carry,',
        '_ = jax.lax.scan(lambda c, x: (step(frozen, c, x)[0], None), carry,', CLAS),
    Bug('clas_begins_last_column', 'classifier', "a row starts at the first chunk whose last token is real (fastai: first column)",
        'flax_ulmfit/models/classifier.py', 'begins = chunk[:, 0] != pad_idx', 'begins = chunk[:, -1] != pad_idx', CLAS),
    Bug('clas_skip_until_started', 'classifier', 'a chunk runs only once some row started before it (its first chunk skipped)',
        'flax_ulmfit/models/classifier.py', 'jax.lax.cond(active.any(), run, skip, state)',
        'jax.lax.cond(started.any(), run, skip, state)', CLAS),
    Bug('clas_config_lm_hidden_p', 'classifier', "awd_lstm_clas_config with the LM's hidden_p 0.15 (fastai's classifier: 0.3)",
        'flax_ulmfit/models/awd_lstm.py', 'output_p=0.4, hidden_p=0.3,', 'output_p=0.4, hidden_p=0.15,', CLAS),
    Bug('clas_head_dropout_before_bn', 'classifier', "the head's dropout before its BatchNorm (fastai: BatchNorm, dropout, Linear)",
        'flax_ulmfit/models/heads.py',
        '    if self.bn is not None:\n      x = self.bn(x)\n'
        '    x = x * dropout_mask if dropout_mask is not None and not self.dropout.deterministic else self.dropout(x)\n',
        '    x = x * dropout_mask if dropout_mask is not None and not self.dropout.deterministic else self.dropout(x)\n'
        '    if self.bn is not None:\n      x = self.bn(x)\n', CLAS),
    Bug('clas_head_mask_unscaled', 'classifier', "the head's dropout masks a plain Bernoulli draw, not scaled by 1/(1-p)",
        'flax_ulmfit/models/classifier.py', 'return [dropout_mask(k, (batch_size, layer.linear.in_features), p)',
        'return [jax.random.bernoulli(k, 1 - p, (batch_size, layer.linear.in_features)).astype(jnp.float32)', CLAS),
    Bug('clas_preset_unfreeze_order', 'classifier', "CLASSIFIER's third stage unfreezes two groups again (fastai: three)",
        'flax_ulmfit/ulmfit.py', 'slice(5e-3 / 2.6 ** 4, 5e-3), freeze_to=-3)', 'slice(5e-3 / 2.6 ** 4, 5e-3), freeze_to=-2)',
        RECIPE),
    # losses
    Bug('ar_on_raw', 'losses', 'AR penalises the raw output instead of the dropped one',
        'flax_ulmfit/train/losses.py', 'ar = jnp.mean(jnp.square(dropped.astype(jnp.float32)))',
        'ar = jnp.mean(jnp.square(raw))', LOSSES + AWD[1:]),
    Bug('tar_time_guard', 'losses', "TAR's one-row guard on the time axis only (fastai's is on the batch axis)",
        'flax_ulmfit/train/losses.py', 'if raw.shape[0] > 1 and raw.shape[1] > 1 else 0.0', 'if raw.shape[1] > 1 else 0.0',
        LOSSES),
    Bug('smoothing_c_minus_1', 'losses', 'label smoothing spreads eps over c - 1 classes (eps / (c - 1))',
        'flax_ulmfit/train/losses.py', '(eps / logits.shape[-1])', '(eps / (logits.shape[-1] - 1))', LOSSES),
    Bug('fused_ce_padding', 'losses', 'fused decoder cross-entropy counts the padded rows of its last chunk',
        'flax_ulmfit/train/losses.py', 'jnp.where(valid, lse - picked, 0.0)', '(lse - picked)', LOSSES),
    Bug('mixup_one_lambda', 'losses', 'mixup draws one lambda for the whole batch, not one per sample',
        'flax_ulmfit/train/mixup.py', 'lam = jax.random.beta(k_lam, alpha, alpha, (batch_size,), jnp.float32)',
        'lam = jnp.full((batch_size,), jax.random.beta(k_lam, alpha, alpha, (), jnp.float32))', LOSSES),
    Bug('mixup_lerp_reversed', 'losses', "mixup's loss weights the shuffled targets by lambda",
        'flax_ulmfit/train/mixup.py', 'loss_b + mix.lam * (loss_a - loss_b)', 'loss_a + mix.lam * (loss_b - loss_a)',
        LOSSES),
    # optimizer and schedules
    Bug('adam_eps_inside', 'optimizer', "Adam's eps inside the square root", 'flax_ulmfit/train/optim.py',
        'jnp.sqrt(s / debias2) + eps', 'jnp.sqrt(s / debias2 + eps)', OPTIM),
    Bug('adam_no_debias1', 'optimizer', "Adam's first moment not debiased", 'flax_ulmfit/train/optim.py',
        '(learning_rate / debias1) * a', 'learning_rate * a', OPTIM),
    Bug('train_bn_ignored', 'optimizer', 'freezing a group freezes its BatchNorm too (train_bn ignored)',
        'flax_ulmfit/train/optim.py', 'g if g not in frozen or keep else FROZEN', 'g if g not in frozen else FROZEN', OPTIM),
    Bug('clip_counts_frozen', 'optimizer', "clipping's global norm includes the frozen parameters' gradients",
        'flax_ulmfit/train/optim.py', '| {FROZEN: optax.set_to_zero()}', '| {FROZEN: optax.identity()}', OPTIM),
    Bug('slice_linear', 'optimizer', "`slice(lo, hi)` spread linearly over the groups instead of geometrically",
        'flax_ulmfit/train/optim.py', 'lr_lo * (lr_hi / lr_lo) ** (np.arange(n_groups) / (n_groups - 1))',
        'np.linspace(lr_lo, lr_hi, n_groups)', OPTIM),
    Bug('one_cycle_pct_03', 'optimizer', "one-cycle warm-up of 30% (torch's OneCycleLR) instead of fastai's 25%",
        'flax_ulmfit/train/schedules.py', 'div_final: float = 1e5,\n              pct_start: float = 0.25) -> optax.Schedule:',
        'div_final: float = 1e5,\n              pct_start: float = 0.3) -> optax.Schedule:', OPTIM),
    Bug('flat_cos_pct', 'optimizer', 'fit_flat_cos anneals from 70% of the run, not 75%',
        'flax_ulmfit/train/schedules.py', 'def flat_cos(total_steps: int, lr: float, pct_start: float = 0.75',
        'def flat_cos(total_steps: int, lr: float, pct_start: float = 0.7', OPTIM),
    Bug('norm_marker_ignored', 'optimizer', "bn_bias_mask misses the project's BatchNorm (is_norm_layer marker ignored)",
        'flax_ulmfit/train/optim.py', "return isinstance(module, FLAX_NORM_LAYERS) or getattr(type(module), 'is_norm_layer', False) is True",
        'return isinstance(module, FLAX_NORM_LAYERS)', OPTIM),
    Bug('wd_on_biases', 'optimizer', 'bn_bias_mask exempts norm layers only: biases decay (wd_bn_bias=False exempts both)',
        'flax_ulmfit/train/optim.py', "lambda path, in_norm: in_norm or path_str(path).split('/')[-1] == 'bias'",
        'lambda path, in_norm: in_norm', OPTIM),
    Bug('grads_summed', 'parallel', 'data parallel: gradients summed over devices, not averaged',
        'flax_ulmfit/train/step.py', 'jax.lax.pmean(x, DATA_AXIS) if', 'jax.lax.psum(x, DATA_AXIS) if',
        ('tests/test_lm_training.py',)),
    Bug('valley_plus_one', 'lr_find', "valley's run start as `end - length + 1` after the loop (a misreading of fastai)",
        'flax_ulmfit/train/lr_find.py', 'end, start = i, i - run[i]', 'end, start = i, i - run[i] + 1',
        ('tests/test_train_loop.py', 'parity_tests/test_fastai_valley.py')),
    Bug('lr_find_untrimmed', 'lr_find', 'lr_find suggests from the whole curve (fastai drops the first tenth and last 5)',
        'flax_ulmfit/train/lr_find.py', 'lo, hi = num_it // 10, len(lrs) - 5', 'lo, hi = 0, len(lrs)',
        ('tests/test_train_loop.py', 'parity_tests/test_fastai_valley.py')),
    # loss scaling
    Bug('scale_past_max', 'scaler', 'the loss scale keeps growing past float32\'s maximum (to inf)',
        'flax_ulmfit/train/precision.py', '    grown = jnp.where(jnp.isfinite(grown), grown, state.scale)  # torch: never past float32\'s max\n',
        '', SCALER),
    Bug('overflow_keeps_count', 'scaler', "an overflow does not reset torch's growth count",
        'flax_ulmfit/train/precision.py', 'overflow_good = jnp.zeros_like(good) if reset_on_overflow else state.good_steps',
        'overflow_good = state.good_steps', SCALER),
    Bug('skip_updates_state', 'scaler', "a skipped step still updates the inner optimizer's state",
        'flax_ulmfit/train/precision.py',
        '    inner_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner_state, state.inner_state)\n',
        '', SCALER),
    Bug('init_scale_unchecked', 'scaler', 'an infinite or NaN init_scale accepted', 'flax_ulmfit/train/precision.py',
        'and 0.0 < init_scale <= _FLOAT32_MAX', 'and init_scale > 0', SCALER),
    # loaders
    Bug('loader_bl', 'loaders', 'LMLoader: `bl = n_tokens // bs` instead of `(n_tokens - 1) // bs`',
        'flax_ulmfit/text/data.py', 'self.bl = (n_tokens - 1) // bs', 'self.bl = n_tokens // bs', LOADERS),
    Bug('loader_empty_last', 'loaders', 'LMLoader: an empty last batch when `bl % bptt == 0` and `drop_last=False`',
        'flax_ulmfit/text/data.py', 'math.ceil(self.bl / bptt)', 'self.bl // bptt + 1', LOADERS),
    Bug('targets_unshifted', 'loaders', 'LMLoader: targets two tokens ahead instead of one',
        'flax_ulmfit/text/data.py', 'stream[1:n + 1].reshape', 'stream[2:n + 2].reshape', LOADERS),
    Bug('pad_chunk_unrounded', 'loaders', "pad_chunk puts all padding first (fastai rounds it to whole bptt chunks)",
        'flax_ulmfit/text/data.py', 'start = n_pad // bptt * bptt', 'start = n_pad', LOADERS),
    # tokenizer, vocabulary, corpora
    Bug('rep_threshold', 'tokenizer', 'xxrep for runs of 4+ characters instead of 3+', 'flax_ulmfit/text/rules.py',
        r"_re_rep = re.compile(r'(\S)(\1{2,})')", r"_re_rep = re.compile(r'(\S)(\1{3,})')", TEXT),
    Bug('maj_single_letter', 'tokenizer', 'xxmaj also before one-letter capitals ("I", "A")', 'flax_ulmfit/text/rules.py',
        "return f'{TK_MAJ} {word.lower()}' if len(word) > 1 else word.lower()", "return f'{TK_MAJ} {word.lower()}'", TEXT),
    Bug('adds_eos', 'tokenizer', 'xxeos appended to every text (fastai adds xxbos only)', 'flax_ulmfit/text/rules.py',
        "return f'{BOS} ' + t.lower().strip()", "return f'{BOS} ' + t.lower().strip() + f' {EOS}'", TEXT),
    Bug('vocab_min_freq', 'tokenizer', 'Vocab keeps tokens seen more than min_freq times (fastai: at least)',
        'flax_ulmfit/text/vocab.py', 'if c >= min_freq]', 'if c > min_freq]', TEXT),
    Bug('vocab_no_extra_fakes', 'tokenizer', 'Vocab adds no xxfake when already a multiple of 8 (fastai adds 8)',
        'flax_ulmfit/text/vocab.py', 'itos += [FAKE] * (8 - len(itos) % 8)', 'itos += [FAKE] * ((8 - len(itos) % 8) % 8)',
        TEXT),
    Bug('templates_not_nested', 'tokenizer', 'wiki markup: nested templates stripped one level only',
        'flax_ulmfit/text/wikimarkup.py', "t = _repeat(_TEMPLATE, '', t)", "t = _TEMPLATE.sub('', t)", TEXT),
]


def _copy_repository(dest: Path) -> None:
  tracked = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True).stdout
  for name in tracked.decode().split('\0'):
    if name and (ROOT / name).is_file():
      (dest / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, dest / name)


def _failed_tests(output: str) -> list[str]:
  return sorted({m.group(1).split('[')[0] for m in re.finditer(r'^(?:FAILED|ERROR) (\S+)', output, re.M)})


def run(bug: Bug, copy: Path) -> list[str]:
  """Plants `bug` in `copy`, runs its tests until one fails, restores the file; returns the failing test."""
  path = copy / bug.path
  original = path.read_text()
  if original.count(bug.old) != 1:
    raise ValueError(f'{bug.name}: the text to replace occurs {original.count(bug.old)} times in {bug.path}')
  path.write_text(original.replace(bug.old, bug.new))
  try:
    env = dict(os.environ, PYTHONPATH=str(copy))
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', *bug.tests],
                            cwd=copy, env=env, capture_output=True, text=True)
  finally:
    path.write_text(original)
  return _failed_tests(result.stdout)


def main(names: list[str]) -> None:
  unknown = set(names) - {b.name for b in BUGS}
  if unknown:
    raise SystemExit(f'planted_bugs: unknown bug names {sorted(unknown)}')
  bugs = [b for b in BUGS if not names or b.name in names]
  with tempfile.TemporaryDirectory() as tmp:
    copy = Path(tmp)
    _copy_repository(copy)
    print('| area | planted bug | caught by |\n|---|---|---|')
    for bug in bugs:
      failed = run(bug, copy)
      caught = ', '.join(f'`{t}`' for t in failed) if failed else '**not caught**'
      print(f'| {bug.area} | {bug.what} | {caught} |', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
