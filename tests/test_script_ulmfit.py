"""scripts/ulmfit.py end to end on small files the tests write (a WikiText file, a CSV): the
three phases of each direction and their folders, predict.py reading the result (the mean of
the forward and backward classifiers' probabilities), and a run killed in the classifier
phase resumed (the finished language-model phases restored) to the same weights."""
import argparse
import json
import signal

import numpy as np
import pytest

from tests import script_runs
from tests.test_script_classifier import PREDICT, _corpus, env, weights  # noqa: F401 (env: a fixture)
from tests.test_script_pretrain_lm import _wikitext

SCRIPT = script_runs.ROOT / 'scripts' / 'ulmfit.py'
TINY = ['--size', 'tiny', '--min-freq', '1', '--save-every', '4',
        '--pretrain-bs', '4', '--pretrain-bptt', '16', '--pretrain-valid-pct', '0.34', '--pretrain-lr', '3e-2',
        '--lm-bs', '4', '--lm-bptt', '16', '--lm-epochs', '1', '1',
        '--clas-bs', '6', '--clas-bptt', '32', '--clas-max-len', '32', '--clas-drop-mult', '0.1',
        '--clas-epochs', '1', '0', '0', '2', '--clas-lrs', '1e-1', '1e-2', '1e-2', '3e-2']

@pytest.fixture(scope='module')
def files(tmp_path_factory):
  folder = tmp_path_factory.mktemp('data')
  return ['--wikitext', _wikitext(folder / 'wiki.train.tokens'), '--csv', _corpus(folder / 'texts.csv')]


def run(args, env):
  return script_runs.run(SCRIPT, args, env, timeout=900)


@pytest.fixture(scope='module')
def whole(tmp_path_factory, files, env):
  out = tmp_path_factory.mktemp('runs') / 'whole'
  result = run([*files, *TINY, '--out', out], env)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


def _config(folder):
  return json.loads((folder / 'config.json').read_text())


def test_ulmfit_runs_the_three_phases_both_ways_and_predict_reads_the_result(whole, env, files):
  out, result = whole
  lines = result.stdout.splitlines()
  for direction, backwards in (('forward', False), ('backward', True)):
    for phase in ('pretrain', 'finetune'):
      lm = out / direction / phase / 'model'
      assert sorted(p.name for p in lm.iterdir()) == ['config.json', 'lm.npz', 'vocab.json']
      assert _config(lm)['backwards'] is backwards
    clf = out / direction / 'model'
    assert sorted(p.name for p in clf.iterdir()) == ['classifier.npz', 'config.json', 'labels.json', 'vocab.json']
    # the classifier reads the fine-tuned language model's vocabulary
    assert (json.loads((clf / 'vocab.json').read_text())['itos']
            == json.loads((out / direction / 'finetune' / 'model' / 'vocab.json').read_text())['itos'])
    # the demo trains on the first 1,000 characters; validation and predict.py read whole texts
    assert _config(clf)['preprocess'] == {'max_chars': None, 'backwards': backwards}
    assert _config(clf)['settings']['train_chars'] == 1000
  # model/: both classifiers, copied; what predict.py --model OUT reads
  assert sorted(p.name for p in (out / 'model').iterdir()) == ['backward', 'config.json', 'forward']
  assert _config(out / 'model')['members'] == ['forward', 'backward']
  for direction in ('forward', 'backward'):
    for name in ('classifier.npz', 'vocab.json', 'labels.json', 'config.json'):
      assert (out / 'model' / direction / name).read_bytes() == (out / direction / 'model' / name).read_bytes()
  assert 'perplexity' in result.stdout and 'valid_accuracy' in result.stdout
  assert lines[-2].startswith('validation accuracy: forward ') and ', both (mean of their probabilities) ' in lines[-2]
  assert lines[-1].startswith('accuracy=')

  # the last line is the accuracy of what predict.py prints for the valid texts; --model OUT
  # equals --model OUT/forward --model OUT/backward
  texts, labels = _valid_texts(files[3])
  both = _predict(['--model', out], texts, env)
  assert _predict(['--model', out / 'forward', '--model', out / 'backward'], texts, env) == both
  accuracy = np.mean([row['label'] == label for row, label in zip(both, labels)])
  assert lines[-1] == f'accuracy={accuracy:.4f}'
  forward, backward = (_predict(['--model', out / d], texts, env) for d in ('forward', 'backward'))
  for row, f, b in zip(both, forward, backward):
    for label, p in row['probabilities'].items():  # float32 probabilities, averaged in float32
      assert abs(p - (f['probabilities'][label] + b['probabilities'][label]) / 2) < 1e-6


def _valid_texts(csv_path):
  """The valid texts and labels of the CSV under ulmfit.py's default split."""
  from flax_ulmfit import ulmfit_cli
  _, _, valid, valid_y, _ = ulmfit_cli.read_labelled(_labelled_args(csv_path, train_chars=1000, max_chars=None))
  return valid, valid_y


def _labelled_args(csv_path, **chars):
  return argparse.Namespace(imdb=None, folder=None, csv=csv_path, text_col='text', label_col='label', valid_pct=0.2,
                            split_seed=42, **chars)


def test_train_chars_cuts_the_training_texts_and_max_chars_what_the_classifier_is_validated_on(tmp_path):
  """--train-chars N: training (the language model's texts, train and valid, and the classifier's
  training texts) reads the first N characters; the classifier's validation reads --max-chars
  (whole texts if None); without --train-chars both read --max-chars; training may not read
  more than --max-chars."""
  from flax_ulmfit import ulmfit_cli
  csv_path = tmp_path / 'long.csv'
  rows = [f'{"abcdefghij" * (3 + i % 4)},{"xy"[i % 2]}' for i in range(10)]  # texts of 30-60 characters
  csv_path.write_text('text,label\n' + '\n'.join(rows) + '\n')
  whole = ulmfit_cli.read_labelled(_labelled_args(csv_path, train_chars=None, max_chars=None))
  assert min(len(t) for t in whole[0] + whole[2]) == 30 and max(len(t) for t in whole[0]) == 60
  args = _labelled_args(csv_path, train_chars=25, max_chars=None)
  train, train_y, valid, valid_y, _ = ulmfit_cli.read_labelled(args)
  assert (train_y, valid_y) == (whole[1], whole[3]) and valid == whole[2]
  assert train == [t[:25] for t in whole[0]] and all(len(t) == 25 for t in train)
  assert ulmfit_cli.lm_valid_texts(valid, args) == [t[:25] for t in whole[2]]
  args = _labelled_args(csv_path, train_chars=None, max_chars=20)
  cut = ulmfit_cli.read_labelled(args)
  assert all(len(t) == 20 for t in cut[0] + cut[2]) and cut[2] == [t[:20] for t in whole[2]]
  assert ulmfit_cli.lm_valid_texts(cut[2], args) == cut[2]
  with pytest.raises(ValueError, match='--train-chars 25 exceeds --max-chars 20'):
    ulmfit_cli.read_labelled(_labelled_args(csv_path, train_chars=25, max_chars=20))


def _predict(model_args, texts, env):
  result = script_runs.run(PREDICT, [*model_args, '--json'], env, input='\n'.join(texts))
  assert result.returncode == 0, result.stderr[-2000:]
  return [json.loads(line) for line in result.stdout.splitlines()]


def test_killed_in_the_backward_classifier_phase_and_resumed_with_both_directions_equals_the_uninterrupted_run(
    tmp_path, files, env, whole):
  """A --direction backward run killed in its classifier phase, resumed as --direction both:
  the backward half continues, the forward half is trained, and both equal --direction both's."""
  out = tmp_path / 'run'
  args = [*files, *TINY, '--out', out]
  killed = script_runs.run_with_signal(SCRIPT, 'ClasLoader', signal.SIGKILL, 0, 6, [*args, '--direction', 'backward'],
                                       env, timeout=900)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert (out / 'backward' / 'finetune' / 'model').is_dir() and not (out / 'backward' / 'model').exists()
  other = run([*args, '--direction', 'backward', '--resume', '--clas-lrs', '1e-1', '1e-2', '1e-2', '1e-2'], env)
  assert other.returncode == 1 and 'clas_lrs' in other.stderr
  resumed = run([*args, '--resume'], env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'epoch 0, batch 4' in resumed.stdout
  for direction in ('forward', 'backward'):
    mine, reference = weights(out / direction), weights(whole[0] / direction)
    for key in reference:
      np.testing.assert_array_equal(mine[key], reference[key], err_msg=f'{direction} {key}')
  assert resumed.stdout.splitlines()[-2:] == whole[1].stdout.splitlines()[-2:]
  assert _config(out / 'model')['members'] == ['forward', 'backward']


def test_finetune_lm_from_fastai_files_and_export_for_fastai(tmp_path, files, env):
  """finetune_lm.py --pretrained/--pretrained-vocab reads a fastai state_dict and itos pickle
  (written here by save_pretrained, as fastai writes them) and --export-fastai writes files
  fastai's load_pretrained / load_encoder read: the vocabulary and shapes of the fine-tuned model."""
  from flax import nnx

  from flax_ulmfit import ulmfit
  from flax_ulmfit.interop import fastai_files
  from flax_ulmfit.models import LanguageModel, awd_lstm_lm_config
  from flax_ulmfit.text.rules import SPECIAL_TOKENS
  itos = list(SPECIAL_TOKENS) + ['bank', 'market', 'goal', 'team', 'robot', 'the', 'elsewhere']
  itos += ['xxfake'] * (-len(itos) % 8)
  lm = LanguageModel(len(itos), dict(awd_lstm_lm_config, emb_sz=16, n_hid=32, n_layers=2), rngs=nnx.Rngs(0))
  weights, vocab = ulmfit.save_pretrained(lm, itos, tmp_path / 'wt')
  out = tmp_path / 'run'
  result = script_runs.run(script_runs.ROOT / 'scripts' / 'finetune_lm.py',
                           [files[2], files[3], '--pretrained', weights, '--pretrained-vocab', vocab, '--size', 'tiny',
                            '--min-freq', '1', '--bs', '4', '--bptt', '16', '--epochs', '1', '1', '--export-fastai',
                            '--out', out], env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'fastai weights' in result.stdout and 'perplexity' in result.stdout
  model = out / 'model'
  assert sorted(p.name for p in model.iterdir()) == ['config.json', 'encoder.pth', 'lm.npz', 'lm.pkl', 'lm.pth', 'vocab.json']
  new_itos = json.loads((model / 'vocab.json').read_text())['itos']
  assert fastai_files.read_itos(model / 'lm.pkl') == new_itos and 'market' in new_itos
  encoder = fastai_files.read_state_dict(model / 'encoder.pth')
  assert encoder['encoder.weight'].shape == (len(new_itos), 16)
  assert fastai_files.read_state_dict(model / 'lm.pth')['1.decoder.bias'].shape == (len(new_itos),)


def test_a_model_built_on_a_language_model_must_read_in_its_direction(whole, files, env, tmp_path):
  out = whole[0]
  script = script_runs.ROOT / 'scripts' / 'train_classifier.py'
  refused = script_runs.run(script, [files[2], files[3], '--lm', out / 'forward' / 'finetune', '--backwards',
                                     '--size', 'tiny', '--out', tmp_path / 'clf'], env)
  assert refused.returncode == 1 and 'reads texts forwards; drop --backwards' in refused.stderr
  refused = script_runs.run(script_runs.ROOT / 'scripts' / 'finetune_lm.py',
                            [files[2], files[3], '--lm', out / 'backward' / 'pretrain', '--size', 'tiny',
                             '--out', tmp_path / 'lm'], env)
  assert refused.returncode == 1 and 'reads texts backwards; add --backwards' in refused.stderr
  assert not (tmp_path / 'clf' / 'model').exists() and not (tmp_path / 'lm' / 'model').exists()
