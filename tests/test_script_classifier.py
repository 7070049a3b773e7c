"""scripts/train_classifier.py and scripts/predict.py end to end on a small CSV the test writes:
the model folder, exact resume after SIGKILL across and inside the gradual-unfreezing stages,
predict.py's round trip (arguments, --file, standard input, --json), hostile input, a
diverging run. Small configs: every text fits one 32-token chunk (one jit shape)."""
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import script_runs

ROOT = script_runs.ROOT
TRAIN = ROOT / 'scripts' / 'train_classifier.py'
PREDICT = ROOT / 'scripts' / 'predict.py'
# 12 batches of 6 per epoch; epochs cost ~0.05 s once compiled
TINY = ['--size', 'tiny', '--bs', '6', '--bptt', '32', '--max-len', '32', '--min-freq', '1', '--drop-mult', '0.1']
# two stages: the head (1 epoch), then all groups (8 epochs), a checkpoint every 4 steps
STAGES = ['--epochs', '1', '0', '0', '8', '--lrs', '1e-1', '1e-2', '1e-2', '3e-2', '--save-every', '4']
TOPICS = {'sport': 'goal match team win score coach league player'.split(),
          'tech': 'phone software chip data cloud app code robot'.split(),
          'money': 'bank market stock price rate trade profit tax'.split()}


def _corpus(path: Path) -> Path:
  """90 short texts (at most 22 tokens with xxbos/xxmaj), 3 topics told apart by their words."""
  r = random.Random(0)
  common = 'the a of and to in is it was for on with'.split()
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['text', 'label'])
    for i in range(90):
      label = list(TOPICS)[i % 3]
      words = [r.choice(TOPICS[label] if r.random() < 0.9 else common) for _ in range(r.randint(5, 18))]
      writer.writerow([' '.join(words) + ' .', label])
  return path


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return script_runs.script_env(tmp_path_factory.mktemp('jax_cache'))


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return _corpus(tmp_path_factory.mktemp('corpus') / 'texts.csv')


run = script_runs.run


def run_with_signal(sig, epoch, batch, args, env):
  """The stage 'all' reads the loader's epoch 1."""
  return script_runs.run_with_signal(TRAIN, 'ClasLoader', sig, epoch, batch, args, env)


def weights(out: Path) -> dict:
  with np.load(out / 'model' / 'classifier.npz', allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def logs(out: Path) -> dict:
  return {p.name: [{k: v for k, v in row.items() if k != 'time'} for row in csv.DictReader(open(p))]
          for p in sorted(out.glob('log-*.csv'))}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, corpus, env):
  out = tmp_path_factory.mktemp('runs') / 'whole'
  result = run(TRAIN, ['--csv', corpus, *TINY, *STAGES, '--out', out], env)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


def test_train_classifier_writes_the_model_folder(uninterrupted):
  out, result = uninterrupted
  assert result.stdout.strip().splitlines()[-1].startswith('accuracy=')
  accuracy = float(result.stdout.strip().splitlines()[-1].split('=')[1])
  assert accuracy > 0.8  # three topics told apart by their words (measured: 0.94; a guess: 1/3)
  assert sorted(p.name for p in (out / 'model').iterdir()) == ['classifier.npz', 'config.json', 'labels.json', 'vocab.json']
  assert sorted(logs(out)) == ['log-0-head.csv', 'log-1-all.csv']
  assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['0-head', '1-all']
  config = json.loads((out / 'model' / 'config.json').read_text())
  assert json.loads((out / 'model' / 'labels.json').read_text())['classes'] == ['money', 'sport', 'tech']
  assert config['arch']['seq_len'] == 32 and config['preprocess'] == {'max_chars': None, 'backwards': False}
  assert [r['stage'] for r in config['history']] == ['head'] + ['all'] * 8


def test_sigkill_at_and_after_a_stage_boundary_then_resume_equals_the_uninterrupted_run(tmp_path, corpus, env,
                                                                                      uninterrupted):
  """SIGKILL as stage 'all' makes its first batch (stage 'head' finished, 'all' not saved yet),
  then, resumed, SIGKILL in the middle of 'all' (after its --save-every checkpoint at batch 4);
  the second --resume ends bit for bit with the uninterrupted run's weights and logs."""
  out = tmp_path / 'run'
  args = ['--csv', corpus, *TINY, *STAGES, '--out', out]
  first = run_with_signal(signal.SIGKILL, 1, 0, args, env)
  assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
  assert not (out / 'model').exists() and sorted(logs(out)) == ['log-0-head.csv']

  refused = run(TRAIN, args, env)  # forgetting --resume must not throw the saved work away
  assert refused.returncode == 1 and 'rerun with --resume' in refused.stderr and 'stage 0-head' in refused.stderr

  second = run_with_signal(signal.SIGKILL, 1, 6, args + ['--resume'], env)
  assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
  assert '(the run had finished)' in second.stdout  # stage 'head' restored, not trained again

  last = run(TRAIN, args + ['--resume'], env)
  assert last.returncode == 0, last.stderr[-3000:]
  assert 'epoch 0, batch 4, step 4' in last.stdout  # stage 'all' from its step-4 checkpoint
  whole, mine = weights(uninterrupted[0]), weights(out)
  assert sorted(whole) == sorted(mine)
  for key in whole:
    np.testing.assert_array_equal(mine[key], whole[key], err_msg=key)
  assert logs(out) == logs(uninterrupted[0])
  assert last.stdout.splitlines()[-1] == uninterrupted[1].stdout.splitlines()[-1]


def _in_process(out: Path, texts: list[str], backwards: bool = False) -> np.ndarray:
  """The classifier's probabilities on the texts' tokens (reversed with `backwards`), in this process."""
  from flax_ulmfit import exports
  from flax_ulmfit.text import Tokenizer
  clf, vocab, labels, _ = exports.load_classifier(out)
  tokens = Tokenizer(n_workers=1, progress=False)(texts)
  return exports.predict_proba(clf, [vocab.numericalize(t[::-1] if backwards else t) for t in tokens])


def test_predict_round_trip(tmp_path, env, uninterrupted):
  """Arguments, --file and standard input give the labels and probabilities of the classifier
  loaded in this process (1e-6: the printed rounding of `label<TAB>p`; JSON is exact to float32)."""
  out = uninterrupted[0]
  texts = ['The coach and the team win the match .', 'Bank profit and the tax rate .', 'A robot writes app code .']
  probs = _in_process(out, texts)
  classes = json.loads((out / 'model' / 'labels.json').read_text())['classes']
  expected = [(classes[int(p.argmax())], float(p.max())) for p in probs]

  def parsed(stdout):
    rows = [line.split('\t') for line in stdout.strip().splitlines()]
    return [(label, float(p)) for label, p in rows]

  by_args = run(PREDICT, ['--model', out, *texts], env)
  assert by_args.returncode == 0, by_args.stderr[-2000:]
  file = tmp_path / 'texts.txt'
  file.write_text('\n'.join(texts) + '\n\n', encoding='utf-8')  # a blank line is skipped
  by_file = run(PREDICT, ['--model', out / 'model', '--file', file], env)
  by_stdin = run(PREDICT, ['--model', out, '--json'], env, input='\n'.join(texts))
  for result in (by_args, by_file):
    got = parsed(result.stdout)
    assert [g[0] for g in got] == [e[0] for e in expected]
    np.testing.assert_allclose([g[1] for g in got], [e[1] for e in expected], atol=1e-6)
  rows = [json.loads(line) for line in by_stdin.stdout.strip().splitlines()]
  assert [r['label'] for r in rows] == [e[0] for e in expected]
  np.testing.assert_allclose([[r['probabilities'][c] for c in classes] for r in rows], probs, rtol=1e-6, atol=1e-7)
  assert all(r['probability'] == max(r['probabilities'].values()) for r in rows)


def test_predict_applies_the_training_prefix(tmp_path, env, uninterrupted):
  """A classifier trained on the first N characters classifies the first N characters."""
  out = tmp_path / 'prefix'
  shutil.copytree(uninterrupted[0] / 'model', out)
  config = json.loads((out / 'config.json').read_text())
  config['preprocess'] = {'max_chars': 20}
  (out / 'config.json').write_text(json.dumps(config))
  text = 'Bank profit and tax . ' + 'goal match team win score coach league player ' * 5
  result = run(PREDICT, ['--model', out, '--json', text], env)
  assert result.returncode == 0, result.stderr[-2000:]
  got = json.loads(result.stdout)['probabilities']
  np.testing.assert_allclose(list(got.values()), _in_process(out, [text[:20]])[0], rtol=1e-6, atol=1e-7)


def test_predict_jsonl_carries_line_breaks(tmp_path, env, uninterrupted):
  """--jsonl: one JSON string per line, so a text keeps its line breaks (as an argument does);
  a line that is not a JSON string is refused, naming it."""
  out = uninterrupted[0]
  texts = ['Bank profit .\n\nThe tax rate and the stock price .', 'The coach and the team\nwin the match .']
  as_args = run(PREDICT, ['--model', out, '--json', *texts], env)
  file = tmp_path / 'texts.jsonl'
  file.write_text('\n'.join(json.dumps(t) for t in texts) + '\n\n', encoding='utf-8')
  as_jsonl = run(PREDICT, ['--model', out, '--json', '--jsonl', '--file', file], env)
  assert as_args.returncode == 0 and as_jsonl.returncode == 0, as_jsonl.stderr[-2000:]
  assert as_jsonl.stdout == as_args.stdout
  np.testing.assert_allclose([list(json.loads(line)['probabilities'].values()) for line in as_jsonl.stdout.splitlines()],
                             _in_process(out, texts), rtol=1e-6, atol=1e-7)
  flattened = _in_process(out, [' '.join(t.split()) for t in texts])  # what one text per line would give
  assert np.abs(flattened - _in_process(out, texts)).max() > 1e-4
  bad = run(PREDICT, ['--model', out, '--jsonl'], env, input='"fine"\n{"text": 1}\n')
  assert bad.returncode == 1 and 'line 2 of standard input' in bad.stderr and 'not a JSON string' in bad.stderr


def _edited_copy(source: Path, target: Path, edit) -> Path:
  """A copy of the model folder `source` whose config.json (or labels.json) `edit` changed."""
  shutil.copytree(source, target)
  for name, key in (('config.json', 'preprocess'), ('labels.json', 'classes')):
    data = json.loads((target / name).read_text())
    data[key] = edit(name, data[key])
    (target / name).write_text(json.dumps(data))
  return target


def test_predict_reads_backwards_and_averages_several_models(tmp_path, env, uninterrupted):
  """A classifier saved with 'backwards' reads each text's tokens reversed; --model A --model B
  prints the mean of their probabilities (JSON floats: float32 exactly, the mean within 1e-7)."""
  model = uninterrupted[0] / 'model'
  backward = _edited_copy(model, tmp_path / 'backward', lambda name, v: dict(v, backwards=True) if name == 'config.json' else v)
  texts = ['The coach and the team win the match .', 'Bank profit and the tax rate .', 'A robot writes app code .']

  def predicted(*models):
    result = run(PREDICT, [arg for m in models for arg in ('--model', m)] + ['--json', *texts], env)
    assert result.returncode == 0, result.stderr[-2000:]
    return np.array([list(json.loads(line)['probabilities'].values()) for line in result.stdout.splitlines()])

  reversed_probs, forward_probs = _in_process(model, texts, backwards=True), _in_process(model, texts)
  assert np.abs(reversed_probs - forward_probs).max() > 1e-3  # the direction changes the answer
  np.testing.assert_allclose(predicted(backward), reversed_probs, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(predicted(model, backward), (forward_probs + reversed_probs) / 2, rtol=1e-6, atol=1e-7)

  relabelled = _edited_copy(model, tmp_path / 'relabelled', lambda name, v: v[::-1] if name == 'labels.json' else v)
  config = json.loads((relabelled / 'config.json').read_text())
  config['classes'] = config['classes'][::-1]
  (relabelled / 'config.json').write_text(json.dumps(config))
  mixed = run(PREDICT, ['--model', model, '--model', relabelled, 'a text'], env)
  assert mixed.returncode == 1 and 'same classes in the same order' in mixed.stderr and 'Traceback' not in mixed.stderr


def test_predict_hostile_input(tmp_path, env, uninterrupted):
  out = uninterrupted[0]
  missing = run(PREDICT, ['--model', out, '--file', tmp_path / 'none.txt'], env)
  assert missing.returncode == 2 and 'no file at' in missing.stderr
  (tmp_path / 'empty.txt').write_text('\n \n', encoding='utf-8')
  empty = run(PREDICT, ['--model', out, '--file', tmp_path / 'empty.txt'], env)
  assert empty.returncode == 1 and 'no text to classify' in empty.stderr and 'Traceback' not in empty.stderr
  both = run(PREDICT, ['--model', out, '--file', tmp_path / 'empty.txt', 'a text'], env)
  assert both.returncode == 2 and 'not both' in both.stderr
  nothing = run(PREDICT, ['--model', tmp_path], env)
  assert nothing.returncode == 1 and 'no classifier.npz in' in nothing.stderr

  other = tmp_path / 'other'
  shutil.copytree(out / 'model', other)
  vocab = json.loads((other / 'vocab.json').read_text())
  vocab['itos'] += ['xxfake'] * 8
  (other / 'vocab.json').write_text(json.dumps(vocab))
  wrong = run(PREDICT, ['--model', other, 'a text'], env)
  assert wrong.returncode == 1 and 'belongs to another model' in wrong.stderr and 'Traceback' not in wrong.stderr

  from flax_ulmfit import exports
  ensemble = tmp_path / 'ensemble'
  exports.save_ensemble(ensemble, {'a': out, 'b': out / 'model'})
  config = json.loads((ensemble / 'config.json').read_text())
  for members, message in ((['a', '../other'], "member '../other' must be a plain folder name"),
                           ([], 'lists no members')):
    (ensemble / 'config.json').write_text(json.dumps(dict(config, members=members)))
    refused = run(PREDICT, ['--model', ensemble, 'a text'], env)
    assert refused.returncode == 1 and message in refused.stderr and 'Traceback' not in refused.stderr
  for text, message in (('garbage{', 'is not readable JSON'),
                        ('{"format": "flax_ulmfit.lm_run/1"}', 'holds a language model, not a classifier')):
    (ensemble / 'config.json').write_text(text)
    refused = run(PREDICT, ['--model', ensemble, 'a text'], env)
    assert refused.returncode == 1 and message in refused.stderr and 'Traceback' not in refused.stderr


def test_a_diverging_run_stops_and_keeps_the_finished_model(tmp_path, corpus, env, uninterrupted):
  """--lrs 1e4: weight decay multiplies the head's weights by 1 - 1e4 * 0.01 = -99 per step,
  so the loss turns inf/NaN; the run exits 1 and model/ stays the previous run's."""
  out = tmp_path / 'run'
  shutil.copytree(uninterrupted[0], out)
  before = weights(out)
  bad = run(TRAIN, ['--csv', corpus, *TINY, '--epochs', '1', '0', '0', '0', '--lrs', '1e4', '1', '1', '1',
                    '--out', out, '--overwrite'], env)
  assert bad.returncode == 1, bad.stderr[-3000:]
  assert 'became inf/NaN' in bad.stderr and 'Traceback' not in bad.stderr
  after = weights(out)
  assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize('flags, message', [
    (['--epochs', '0', '0', '0', '0'], 'at least one stage must train'),
    (['--epochs', '1', '1'], 'expected 4 arguments'),
    (['--lrs', '1e-2', 'nan', '1e-3', '1e-3'], '--lrs: expected a finite number > 0'),
    (['--bs', '0'], '--bs: expected an integer >= 1'),
    (['--bptt', '32', '--max-len', '48'], 'must be a multiple of --bptt 32'),
    (['--clip', '-1'], '--clip: expected a finite number >= 0'),
    (['--valid-pct', '0'], '--valid-pct: expected a number strictly between 0 and 1'),
    (['--csv', 'nope.csv'], "no file at 'nope.csv'"),
    (['--lm', 'nope'], "no folder at 'nope'"),
    (['--folder', 'x', '--imdb', 'y'], 'not allowed with argument'),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, flags, message):
  result = subprocess.run([sys.executable, str(TRAIN), '--out', str(tmp_path / 'run'), *flags], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert not (tmp_path / 'run').exists()
