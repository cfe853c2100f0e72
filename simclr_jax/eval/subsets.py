"""Seeded subsets of a split that represent it: class by class, never "the first N".

No TensorFlow here: evaluation during pretraining uses these where TensorFlow is absent.
"""
import numpy as np


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of a seeded class-balanced subset: per class round(fraction × count), ≥ 1.

  Rounding is half-up. Each class draws from its own generator seeded by (seed, class), so a
  class's choice does not depend on which other classes are present.
  """
  labels = np.asarray(labels)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'fraction={fraction} must be in (0, 1].')
  chosen = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    m = min(len(idx), max(1, int(np.floor(fraction * len(idx) + 0.5))))
    rng = np.random.default_rng([seed, int(c)])
    chosen.append(rng.choice(idx, size=m, replace=False))
  if not chosen:
    return np.zeros((0,), np.int64)
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def knn_memory(ids: np.ndarray, labels: np.ndarray, max_examples: int, seed: int) -> np.ndarray:
  """Sorted ids of a kNN memory: every labelled example when there are at most
  `max_examples` (or `max_examples` <= 0), else a seeded sample of about `max_examples` whose
  class histogram follows the split's (`balanced_subset`, per class round(count × fraction)).

  A source listed class by class (an image folder) gives the same kind of memory as one in
  random order: which examples are chosen depends on the seed and the labels, not on position.
  """
  ids, labels = np.asarray(ids), np.asarray(labels)
  labelled = np.flatnonzero(labels >= 0)
  if max_examples <= 0 or len(labelled) <= max_examples:
    return np.sort(ids[labelled])
  chosen = balanced_subset(labels[labelled], max_examples / len(labelled), seed)
  return np.sort(ids[labelled[chosen]])
