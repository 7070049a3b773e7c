"""Classifies texts with the classifiers that train_classifier.py or ulmfit.py trained.

Reads each classifier, its vocabulary, labels and preprocessing (e.g. the first N characters
of each text, read backwards) from --model (a run's --out folder or its model/; ulmfit.py's
holds a forward and a backward classifier), then the texts: the arguments, --file F (one text
per line), or standard input (one text per line); with --jsonl each line of the file or input is
a JSON string, for texts with line breaks. Several models (--model A --model B) average their
class probabilities. Prints one line per text, `label<TAB>probability` (the most probable
class), or with --json one JSON object per line,
{"label": ..., "probability": ..., "probabilities": {class: p, ...}}.

  python scripts/predict.py --model runs/ulmfit "Shares in the bank fell 5% after its results."
  python scripts/predict.py --model runs/ulmfit --file articles.txt --json
  cat articles.txt | python scripts/predict.py --model runs/forward --model runs/backward
"""
from __future__ import annotations

import argparse
import json
import sys

from flax_ulmfit import cli


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('texts', nargs='*', help='texts to classify (default: --file, else standard input)')
  parser.add_argument('--model', type=cli.existing_dir, action='append', required=True, metavar='DIR',
                      help='the --out folder of train_classifier.py or ulmfit.py (or its model/ folder); repeated: '
                           'the mean of the models\' probabilities')
  parser.add_argument('--file', type=cli.existing_file, help='a UTF-8 file with one text per line')
  parser.add_argument('--jsonl', action='store_true',
                      help='--file / standard input hold one JSON string per line (texts that contain line breaks)')
  parser.add_argument('--json', action='store_true', help='one JSON object per line instead of label<TAB>probability')
  parser.add_argument('--bs', type=cli.positive_int, default=64, help='texts per batch')
  args = parser.parse_args(argv)
  if args.texts and args.file:
    parser.error('give texts as arguments or --file, not both')
  if args.texts and args.jsonl:
    parser.error('--jsonl reads --file or standard input, not arguments')
  return args


def read_texts(args: argparse.Namespace) -> list[str]:
  """The texts to classify; blank lines of a file or of standard input are skipped."""
  if args.texts:
    texts = args.texts
  else:
    from flax_ulmfit.text.files import read_text
    lines = read_text(args.file).splitlines() if args.file else sys.stdin.read().splitlines()
    texts = [line for line in lines if line.strip()]
  where = args.file or ('the arguments' if args.texts else 'standard input')
  if args.jsonl:
    texts = [_json_text(line, i, where) for i, line in enumerate(texts)]
  empty = [i for i, t in enumerate(texts) if not t.strip()]
  if not texts or empty:
    raise ValueError(f'no text to classify in {where}' if not texts else f'text #{empty[0]} of {where} is empty')
  return texts


def _json_text(line: str, i: int, where) -> str:
  try:
    text = json.loads(line)
  except json.JSONDecodeError as err:
    raise ValueError(f'--jsonl: line {i + 1} of {where} (blank lines not counted) is not JSON: {err}') from None
  if not isinstance(text, str):
    raise ValueError(f'--jsonl: line {i + 1} of {where} (blank lines not counted) holds a {type(text).__name__}, '
                     'not a JSON string')
  return text


def main(args: argparse.Namespace) -> None:
  from flax_ulmfit import exports
  from flax_ulmfit.text import Tokenizer
  classifiers = [member for folder in args.model for member in exports.load_classifiers(folder)]
  texts = read_texts(args)
  probs = exports.predict_texts(classifiers, texts, Tokenizer(n_workers=1, progress=False), args.bs)
  labels = classifiers[0][2]
  for row in probs:
    best = int(row.argmax())
    if args.json:
      print(json.dumps({'label': labels.classes[best], 'probability': float(row[best]),
                        'probabilities': dict(zip(labels.classes, map(float, row)))}, ensure_ascii=False))
    else:
      print(f'{labels.classes[best]}\t{row[best]:.6f}')


if __name__ == '__main__':
  sys.exit(cli.run_script('predict', lambda: main(parse_args())))
