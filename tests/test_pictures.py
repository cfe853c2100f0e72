"""Pictures: valid PNGs of the promised pixel size; per-class accuracy against a numpy loop."""
import numpy as np
import pytest
from PIL import Image

from simclr_jax.eval import features, pictures


def _png_size(path):
  with Image.open(path) as im:
    im.verify()  # a whole, readable PNG
  with Image.open(path) as im:
    return im.format, im.size


def test_embedding_map_one_and_two_panels(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 12)
  # Three well-separated clusters, so t-SNE has something to show (and converges fast).
  feats = rng.normal(0, 0.1, (36, 8)) + np.eye(8)[labels] * 3
  w, h = pictures.PANEL_PX
  pictures.embedding_map(str(tmp_path / 'one.png'), feats, labels, class_names=['a', 'b', 'c'])
  assert _png_size(tmp_path / 'one.png') == ('PNG', (w, h))
  pictures.embedding_map(str(tmp_path / 'two.png'), feats, labels,
                         baseline=rng.normal(size=(36, 8)), max_points=30)
  assert _png_size(tmp_path / 'two.png') == ('PNG', (2 * w, h))


def test_embedding_map_rejects_mismatched_rows(tmp_path):
  with pytest.raises(ValueError, match='baseline'):
    pictures.embedding_map(str(tmp_path / 'x.png'), np.zeros((5, 2)), np.zeros(5),
                           baseline=np.zeros((4, 2)))


def test_training_curves(tmp_path):
  rows = [{'step': s, 'loss': 5.0 - s / 100, 'contrastive_acc': s / 400, 'probe_acc': s / 500}
          for s in range(0, 200, 20)]
  rows += [{'step': 100, 'eval/probe_top1': 0.5, 'eval/knn_top1': 0.4, 'eval/knn_top5': 0.9}]
  w, h = pictures.PANEL_PX
  pictures.training_curves(str(tmp_path / 'curves.png'), rows)
  assert _png_size(tmp_path / 'curves.png') == ('PNG', (2 * w, h))
  # Only the evaluation rows: the loss panel is left out.
  pictures.training_curves(str(tmp_path / 'eval.png'), rows[-1:])
  assert _png_size(tmp_path / 'eval.png') == ('PNG', (w, h))
  with pytest.raises(ValueError, match='no loss'):
    pictures.training_curves(str(tmp_path / 'none.png'), [{'step': 1, 'images_per_sec': 3.0}])


def test_per_class_accuracy_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(200, 5))
  labels = rng.integers(0, 4, 200)  # class 4 has no examples: absent from the result
  got = features.per_class_accuracy(logits, labels)
  pred = np.argmax(logits, axis=1)  # continuous random logits: no ties
  want = {str(c): float(np.mean(pred[labels == c] == c)) for c in range(4)}
  assert got.keys() == want.keys()
  for c in want:
    # The same count over the same n in float64: pytest's default rel 1e-6 covers the division.
    assert got[c] == pytest.approx(want[c])
  # The count-weighted mean is the overall top-1 of features.topk_accuracy.
  counts = np.bincount(labels)
  mean = sum(got[str(c)] * counts[c] for c in range(4)) / len(labels)
  # ~10 float64 roundings (~1e-15) of the same counts, under pytest's default rel 1e-6.
  assert mean == pytest.approx(features.topk_accuracy(logits, labels)['top1'])
  named = features.per_class_accuracy(logits, labels, class_names=list('abcde'))
  assert list(named) == list('abcd')
