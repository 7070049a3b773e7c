"""The baseline the ULMFiT demo must beat: TF-IDF + logistic regression on BBC News.

Same split as `scripts/ulmfit.py`: `perm = RandomState(42).permutation(2225)` over the
articles in `bbc_news()` order, `perm[:445]` valid, `perm[445:]` train. scikit-learn's
`TfidfVectorizer(sublinear_tf=True, min_df=2)` and `LogisticRegression(C=10)`, fitted on the
training texts, on full articles and on their first 1,000 characters.

  PYTHONPATH=. python benchmarks/tfidf_baseline.py

Prints one line per variant: `<variant> accuracy=<valid accuracy> seconds=<fit + predict>`.
"""
import time

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from flax_ulmfit.text.corpora import bbc_news


def accuracy(train_texts, train_labels, valid_texts, valid_labels) -> float:
  vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=2)
  clf = LogisticRegression(C=10, max_iter=1000)
  clf.fit(vectorizer.fit_transform(train_texts), train_labels)
  return float(np.mean(clf.predict(vectorizer.transform(valid_texts)) == np.asarray(valid_labels)))


def main():
  texts, labels = bbc_news()
  perm = np.random.RandomState(42).permutation(len(texts))
  valid, train = perm[:445], perm[445:]
  for name, prefix in (('full articles', None), ('first 1000 chars', 1000)):
    cut = [t[:prefix] for t in texts]
    start = time.perf_counter()
    acc = accuracy([cut[i] for i in train], [labels[i] for i in train],
                   [cut[i] for i in valid], [labels[i] for i in valid])
    print(f'{name:>16}: accuracy={acc:.4f} seconds={time.perf_counter() - start:.2f}')


if __name__ == '__main__':
  main()
