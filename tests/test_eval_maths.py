"""Tests of the evaluation maths against independent numpy computations."""
import jax
import numpy as np
import pytest

from simclr_jax.eval import features, finetune, knn, linear_probe
from simclr_jax import parallel
from simclr_jax.models import simclr


def _blobs(rng: np.random.Generator, n: int, num_classes: int, dim: int,
           centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Gaussian blobs (unit noise) around well-separated class centres."""
  labels = rng.integers(0, num_classes, n)
  feats = centres[labels] + rng.normal(size=(n, dim))
  return feats.astype(np.float32), labels.astype(np.int32)


# --- linear probe --------------------------------------------------------------------------------


def test_linear_probe_separates_separable_features():
  rng = np.random.default_rng(0)
  num_classes, dim = 10, 32
  centres = rng.normal(size=(num_classes, dim)) * 3.0 + 5.0  # offset: standardisation matters
  x_train, y_train = _blobs(rng, 2000, num_classes, dim, centres)
  x_test, y_test = _blobs(rng, 1000, num_classes, dim, centres)
  params = linear_probe.train_linear_probe(x_train, y_train, num_classes, epochs=10, batch_size=128,
                                       learning_rate=0.1, seed=0)
  logits = np.asarray(linear_probe.predict_linear_probe(params, x_test))
  assert np.mean(logits.argmax(1) == y_test) >= 0.99
  # The standardisation stats travel with the params and are the train set's.
  np.testing.assert_allclose(params['mean'], x_train.mean(0), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(params['var'], x_train.var(0), rtol=1e-4)


def test_linear_probe_nesterov_and_weight_decay_separates_linear_map_labels():
  rng = np.random.default_rng(1)
  num_classes, dim = 4, 16
  w = rng.normal(size=(dim, num_classes))
  x = rng.normal(size=(3000, dim)).astype(np.float32)
  y = (x @ w).argmax(1).astype(np.int32)
  params = linear_probe.train_linear_probe(x[:2000], y[:2000], num_classes, epochs=30,
                                       batch_size=100, learning_rate=1.0, nesterov=True,
                                       weight_decay=1e-6, seed=3)
  logits = np.asarray(linear_probe.predict_linear_probe(params, x[2000:]))
  # Labels from an exact linear map: a linear probe gets nearly all of them.
  assert np.mean(logits.argmax(1) == y[2000:]) >= 0.97


def test_linear_probe_stays_at_chance_on_random_labels():
  rng = np.random.default_rng(2)
  num_classes, dim, n_test = 10, 32, 2000
  x_train = rng.normal(size=(1000, dim)).astype(np.float32)
  y_train = rng.integers(0, num_classes, 1000)
  x_test = rng.normal(size=(n_test, dim)).astype(np.float32)
  y_test = rng.integers(0, num_classes, n_test)
  params = linear_probe.train_linear_probe(x_train, y_train, num_classes, epochs=20, batch_size=100,
                                       learning_rate=0.5, seed=0)
  # It can memorise the training set a little, but learns nothing that transfers.
  train_acc = np.mean(np.asarray(linear_probe.predict_linear_probe(params, x_train)).argmax(1)
                      == y_train)
  test_acc = np.mean(np.asarray(linear_probe.predict_linear_probe(params, x_test)).argmax(1)
                     == y_test)
  p = 1 / num_classes
  assert abs(test_acc - p) < 4 * np.sqrt(p * (1 - p) / n_test)
  assert train_acc > test_acc


def test_linear_probe_is_deterministic_given_seed():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(300, 8)).astype(np.float32)
  y = rng.integers(0, 3, 300)
  kw = dict(epochs=2, batch_size=32, learning_rate=0.1)
  a = linear_probe.train_linear_probe(x, y, 3, seed=5, **kw)
  b = linear_probe.train_linear_probe(x, y, 3, seed=5, **kw)
  c = linear_probe.train_linear_probe(x, y, 3, seed=6, **kw)
  np.testing.assert_array_equal(a['kernel'], b['kernel'])
  assert not np.allclose(a['kernel'], c['kernel'])


# --- top-k ---------------------------------------------------------------------------------------


def _topk_reference(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the argsort's last k entries."""
  top = np.argsort(logits, axis=1)[:, ::-1][:, :k]
  return float(np.mean([labels[i] in top[i] for i in range(len(labels))]))


@pytest.mark.parametrize('num_classes', [3, 10, 100])
def test_topk_accuracy_matches_numpy_reference(num_classes):
  rng = np.random.default_rng(num_classes)
  logits = rng.normal(size=(500, num_classes)).astype(np.float32)
  labels = rng.integers(0, num_classes, 500)
  got = features.topk_accuracy(logits, labels)
  assert set(got) == {'top1', 'top5'}
  assert got['top1'] == pytest.approx(_topk_reference(logits, labels, 1))
  assert got['top5'] == pytest.approx(_topk_reference(logits, labels, min(5, num_classes)))
  if num_classes < 5:
    assert got['top5'] == 1.0


def test_topk_accuracy_simple_case():
  logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.15, 0.1], [0.2, 0.3, 0.5]])
  got = features.topk_accuracy(logits, np.array([1, 2, 1]), ks=(1, 2))
  assert got == {'top1': pytest.approx(1 / 3), 'top2': pytest.approx(2 / 3)}
  # A tie with the label counts in the example's favour.
  tied = np.array([[0.8, 0.1, 0.1]])
  assert features.topk_accuracy(tied, np.array([2]), ks=(1, 2)) == {'top1': 0.0, 'top2': 1.0}


# --- kNN -----------------------------------------------------------------------------------------


def _knn_reference(train, train_labels, test, num_classes, k, temperature):
  """Weighted kNN written out one test row at a time in float64."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  k = min(k, len(train))
  scores = np.zeros((len(test), num_classes))
  for i, q in enumerate(test):
    sims = np.array([float(np.dot(q, t)) for t in train])
    for j in np.argsort(-sims)[:k]:
      scores[i, train_labels[j]] += np.exp(sims[j] / temperature)
  return scores


@pytest.mark.parametrize('k,batch_size', [(7, 16), (200, 64), (1, 1000)])
def test_knn_matches_numpy_reference(k, batch_size):
  rng = np.random.default_rng(k)
  num_classes = 5
  train = rng.normal(size=(120, 12)).astype(np.float32) * rng.uniform(0.5, 2, (120, 1))
  train_labels = rng.integers(0, num_classes, 120)
  test = rng.normal(size=(37, 12)).astype(np.float32)  # 37: the last chunk is partial
  test_labels = rng.integers(0, num_classes, 37)
  got = knn.knn_predict(train, train_labels, test, num_classes, k=k, temperature=0.1,
                             batch_size=batch_size)
  want = _knn_reference(train.astype(np.float64), train_labels, test.astype(np.float64),
                        num_classes, k, 0.1)
  assert got.shape == (37, num_classes)
  np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  acc = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes, k=k,
                              temperature=0.1, batch_size=batch_size)
  assert acc['top1'] == pytest.approx(np.mean(want.argmax(1) == test_labels))
  assert acc['top5'] == 1.0  # 5 classes


def test_knn_classifies_blobs():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16)) * 4
  x_train, y_train = _blobs(rng, 400, 4, 16, centres)
  x_test, y_test = _blobs(rng, 100, 4, 16, centres)
  assert knn.knn_accuracy(x_train, y_train, x_test, y_test, 4, k=20)['top1'] >= 0.99


# --- feature extraction --------------------------------------------------------------------------


def _padded_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> list[dict]:
  """Eval batches of a fixed size; the last one padded with zero images and mask 0."""
  batches = []
  for start in range(0, len(images), batch_size):
    img, lab = images[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - len(img)
    batches.append({
        'image': np.concatenate([img, np.zeros((pad,) + img.shape[1:], img.dtype)]),
        'label': np.concatenate([lab, np.full((pad,), -1, lab.dtype)]),
        'mask': np.concatenate([np.ones(len(img), bool), np.zeros(pad, bool)]),
    })
  return batches


def _random_variables(model, image_shape: tuple[int, ...], seed: int) -> dict:
  """Variables with model.init's structure (via eval_shape) and seeded non-trivial values.

  Faster than model.init on CPU (no compile), and unlike it no BN gamma is zero, so every
  residual branch and non-trivial BN running statistics enter the features.
  """
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), np.zeros((2,) + image_shape, np.float32),
                         train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':  # He-normal on the fan-in
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_extract_features_drops_padding_and_matches_single_device(devices):
  model = simclr.SimCLR(depth=18, width=0.0625, cifar_stem=True, num_classes=0)
  rng = np.random.default_rng(0)
  n, batch_size = 21, 8  # 21 = 2 full batches + 5 real rows and 3 padded rows
  images = rng.random((n, 8, 8, 3), dtype=np.float32)
  labels = np.arange(n, dtype=np.int32) * 3 % 10
  variables = _random_variables(model, (8, 8, 3), seed=0)

  mesh8 = parallel.make_mesh(devices)
  feats8, labels8 = features.extract_features(
      features.make_feature_fn(model, mesh8), variables,
      _padded_batches(images, labels, batch_size), mesh8)
  mesh1 = parallel.make_mesh(jax.devices()[:1])
  feats1, labels1 = features.extract_features(
      features.make_feature_fn(model, mesh1), variables,
      _padded_batches(images, labels, batch_size), mesh1)

  apply_h = jax.jit(lambda v, x: model.apply(v, x, train=False)['h'])
  direct = np.asarray(apply_h(variables, images))
  width = direct.shape[-1]
  assert feats8.shape == (n, width) and feats8.dtype == np.float32
  assert np.std(feats8, axis=0).mean() > 1e-3  # distinct images give distinct features
  np.testing.assert_array_equal(labels8, labels)  # every example once, in order
  np.testing.assert_array_equal(labels1, labels)
  np.testing.assert_allclose(feats8, feats1, rtol=1e-5, atol=1e-5)
  # And each row is that image's own inference-mode feature (batch composition does not matter).
  np.testing.assert_allclose(feats8, direct, rtol=1e-4, atol=1e-5)


# --- label fractions -----------------------------------------------------------------------------


def test_balanced_subset():
  rng = np.random.default_rng(0)
  counts = {0: 100, 1: 40, 2: 7, 3: 1}
  labels = rng.permutation(np.concatenate([np.full(c, k) for k, c in counts.items()]))
  sub = finetune.balanced_subset(labels, 0.1, seed=0)
  per_class = {k: int(np.sum(labels[sub] == k)) for k in counts}
  assert per_class == {0: 10, 1: 4, 2: 1, 3: 1}  # round(0.7) = 1; at least 1 for class 3
  assert len(np.unique(sub)) == len(sub)
  np.testing.assert_array_equal(sub, finetune.balanced_subset(labels, 0.1, seed=0))
  assert not np.array_equal(sub, finetune.balanced_subset(labels, 0.1, seed=1))
  np.testing.assert_array_equal(finetune.balanced_subset(labels, 1.0, seed=3),
                                np.arange(len(labels)))
  half = finetune.balanced_subset(labels, 0.5, seed=0)
  assert {k: int(np.sum(labels[half] == k)) for k in counts} == {0: 50, 1: 20, 2: 4, 3: 1}
  with pytest.raises(ValueError):
    finetune.balanced_subset(labels, 0.0, seed=0)
