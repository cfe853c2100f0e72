"""Tests of the evaluation maths against independent numpy computations."""
import math

import jax
import numpy as np
import pytest

import numerics
from configs import base, linear_eval
from simclr_jax import optim, parallel
from simclr_jax.eval import features, knn, linear_probe, subsets
from simclr_jax.models import simclr


def _blobs(rng: np.random.Generator, n: int, num_classes: int, dim: int,
           centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Gaussian blobs (unit noise) around well-separated class centres."""
  labels = rng.integers(0, num_classes, n)
  feats = centres[labels] + rng.normal(size=(n, dim))
  return feats.astype(np.float32), labels.astype(np.int32)


# --- linear probe --------------------------------------------------------------------------------


def _protocol(**kw):
  base = dict(mode='cached', epochs=10.0, steps=50, batch_size=128, base_lr=0.1,
              lr_scaling='linear', learning_rate=0.1 * 128 / 256, momentum=0.9, nesterov=True,
              weight_decay=0.0, standardise=False, augmentation='none (eval view)')
  base.update(kw)
  return linear_probe.Protocol(**base)


def _official_steps_and_lr(num_examples, epochs, batch_size, base_lr, step):
  """tf2/model.py transcribed: get_train_steps and WarmUpAndCosineDecay with warmup_epochs=0."""
  total_steps = num_examples * epochs // batch_size + 1
  scaled_lr = base_lr * batch_size / 256.  # learning_rate_scaling='linear'
  warmup_steps = int(round(0 * num_examples // batch_size))
  # tf.keras.experimental.CosineDecay(scaled_lr, total_steps - warmup_steps), alpha 0.
  decay_steps = total_steps - warmup_steps
  fraction = min(step - warmup_steps, decay_steps) / decay_steps
  return total_steps, scaled_lr * 0.5 * (1 + math.cos(math.pi * fraction))


@pytest.mark.parametrize('preset,num_examples', [('cifar', 50_000), ('imagenet', 1_281_167)])
def test_probe_protocol_is_the_official_schedule(preset, num_examples):
  probe = linear_eval.get_config().probe
  probe.update(probe.presets[preset])
  probe = linear_probe.resolve_views(probe, base.get_config().augment)
  p = linear_probe.protocol(probe, num_examples)
  epochs = int(probe.epochs)
  want_steps, _ = _official_steps_and_lr(num_examples, epochs, probe.batch_size, 0.1, 0)
  assert p.steps == want_steps == {'cifar': 9766, 'imagenet': 28151}[preset]
  # 0.1 * batch / 256 in float64: a rounding or two (~1e-16) under pytest's default rel 1e-6.
  assert p.learning_rate == pytest.approx({'cifar': 0.2, 'imagenet': 1.6}[preset])
  schedule = optim.warmup_cosine(p.learning_rate, 0, p.steps)
  for step in (0, 1, 17, p.steps // 2, p.steps - 1, p.steps):
    _, want = _official_steps_and_lr(num_examples, epochs, probe.batch_size, 0.1, step)
    # float32 lr · 0.5(1 + cos): ≤ 3 eps · lr worst case (≤ 0.85 eps · lr over every step);
    # a one-step shift at steps // 2 moves lr by ≥ 3e-5, 300x this.
    assert float(schedule(step)) == pytest.approx(
        want, rel=0, abs=4 * numerics.EPS32 * p.learning_rate), step
  assert (p.mode, p.nesterov, p.momentum, p.standardise) == ('augmented', True, 0.9, False)
  assert p.weight_decay == {'cifar': 0.0, 'imagenet': 1e-6}[preset]


def _softmax_grad(w, b, x, y):
  """Gradient of the mean softmax cross-entropy of x @ w + b w.r.t. (w, b), in float64."""
  logits = x @ w + b
  prob = np.exp(logits - logits.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  prob[np.arange(len(y)), y] -= 1
  prob /= len(y)
  return x.T @ prob, prob.sum(0)


def test_probe_update_is_keras_nesterov_sgd_with_l2_on_kernel_and_bias():
  rng = np.random.default_rng(0)
  n, dim, classes = 40, 6, 3
  x = rng.normal(size=(n, dim)).astype(np.float32)
  y = rng.integers(0, classes, n).astype(np.int32)
  p = _protocol(steps=7, batch_size=16, learning_rate=0.8, weight_decay=0.05)
  got = linear_probe.train_cached(x, y, classes, p, seed=3)
  # Reference: TF's ApplyKerasMomentum (accum = accum * m - grad * lr; var += accum * m -
  # grad * lr with Nesterov) on grad = dCE/dw + wd * w (official add_weight_decay on every
  # trainable variable), cosine lr, zero init, the same batches.
  w, b = np.zeros((dim, classes)), np.zeros(classes)
  acc_w, acc_b = np.zeros_like(w), np.zeros_like(b)
  batches = linear_probe.index_batches(n, 16, seed=3)
  for step in range(p.steps):
    idx = next(batches)
    lr = p.learning_rate * 0.5 * (1 + math.cos(math.pi * step / p.steps))
    gw, gb = _softmax_grad(w, b, x[idx].astype(np.float64), y[idx])
    gw, gb = gw + p.weight_decay * w, gb + p.weight_decay * b
    acc_w, acc_b = acc_w * 0.9 - gw * lr, acc_b * 0.9 - gb * lr
    w, b = w + acc_w * 0.9 - gw * lr, b + acc_b * 0.9 - gb * lr
  # float32 against float64: 7 steps of ≤ 16-term sums, ≤ 7·16·eps ≈ 1.3e-5 of each array's
  # scale. Plain momentum, no wd on the bias, or the lr a step late move one by ≥ 6e-3 of it.
  for name, want in (('kernel', w), ('bias', b)):
    np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-4 * np.abs(want).max(),
                               err_msg=name)
  assert 'mean' not in got  # standardisation is off by default


def test_index_batches_cross_epochs_and_cover_every_example_once_per_epoch():
  n, batch = 10, 4
  it = linear_probe.index_batches(n, batch, seed=0)
  rows = np.concatenate([next(it) for _ in range(10)])  # 40 rows = 4 epochs, no remainder dropped
  for e in range(4):
    np.testing.assert_array_equal(np.sort(rows[e * n:(e + 1) * n]), np.arange(n))
  assert not np.array_equal(rows[:n], rows[n:2 * n])
  np.testing.assert_array_equal(rows[:n], np.random.default_rng([0, 0]).permutation(n))
  big = next(linear_probe.index_batches(3, 7, seed=1))  # a batch larger than the data set
  assert np.bincount(big[:6], minlength=3).tolist() == [2, 2, 2]


def test_streamed_probe_equals_the_cached_probe_on_the_same_batches():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(50, 8)).astype(np.float32)
  y = rng.integers(0, 4, 50).astype(np.int32)
  p = _protocol(steps=9, batch_size=16, learning_rate=0.5, weight_decay=1e-3, standardise=True)
  cached = linear_probe.train_cached(x, y, 4, p, seed=2)
  stats = linear_probe.standardisation(x)
  batches = ((x[i], y[i]) for i in linear_probe.index_batches(50, 16, seed=2))
  streamed = linear_probe.train_streamed(batches, 8, 4, p, stats)
  assert set(streamed) == set(cached) == {'kernel', 'bias', 'mean', 'var'}
  for k in ('mean', 'var'):  # both from standardisation(x): the same numpy float64 code
    np.testing.assert_array_equal(streamed[k], cached[k], err_msg=k)
  for k in ('kernel', 'bias'):
    # Two XLA programs (gather inside or not): 9 steps of ≤ 16-term float32 sums, ≤ 1.7e-5 of
    # the scale; a skipped or reordered batch moves the result by ≥ 6e-3 of it.
    np.testing.assert_allclose(streamed[k], cached[k], rtol=0,
                               atol=1e-4 * np.abs(cached[k]).max(), err_msg=k)
  # A float64 mean rounded once to float32: within u = eps / 2 of the float64 mean.
  np.testing.assert_allclose(cached['mean'], x.astype(np.float64).mean(0), rtol=numerics.EPS32,
                             atol=0)
  with pytest.raises(ValueError, match='ended after 2 of 9 steps'):
    linear_probe.train_streamed(iter([(x[:16], y[:16])] * 2), 8, 4, p, stats)


@pytest.mark.parametrize('standardise', [False, True])
def test_cached_probe_separates_separable_features(standardise):
  rng = np.random.default_rng(0)
  num_classes, dim = 10, 32
  centres = rng.normal(size=(num_classes, dim)) * 3.0 + 5.0  # off-centre features
  x_train, y_train = _blobs(rng, 2000, num_classes, dim, centres)
  x_test, y_test = _blobs(rng, 1000, num_classes, dim, centres)
  p = _protocol(steps=2000 * 10 // 128 + 1, learning_rate=0.05, standardise=standardise)
  params = linear_probe.train_cached(x_train, y_train, num_classes, p, seed=0)
  logits = np.asarray(linear_probe.predict_linear_probe(params, x_test))
  # Centres ≥ 16.7 noise σ apart: measured 1000 of 1000, each top logit ahead by ≥ 3.9.
  assert np.mean(logits.argmax(1) == y_test) >= 0.99


def test_cached_probe_stays_at_chance_on_random_labels():
  rng = np.random.default_rng(2)
  num_classes, dim, n_test = 10, 32, 2000
  x_train = rng.normal(size=(1000, dim)).astype(np.float32)
  y_train = rng.integers(0, num_classes, 1000)
  x_test = rng.normal(size=(n_test, dim)).astype(np.float32)
  y_test = rng.integers(0, num_classes, n_test)
  p = _protocol(steps=1000 * 20 // 100 + 1, batch_size=100, learning_rate=0.5)
  params = linear_probe.train_cached(x_train, y_train, num_classes, p, seed=0)
  predict = lambda x: np.asarray(linear_probe.predict_linear_probe(params, x)).argmax(1)  # noqa
  train_acc, test_acc = np.mean(predict(x_train) == y_train), np.mean(predict(x_test) == y_test)
  # It memorises the training set a little, but learns nothing that transfers.
  q = 1 / num_classes
  # 4 s.e. of chance: a correct probe lands outside with two-sided p ≈ 6e-5 (measured -0.7 s.e.).
  assert abs(test_acc - q) < 4 * np.sqrt(q * (1 - q) / n_test)
  assert train_acc > test_acc  # measured 0.228 vs 0.095: ~9 s.e. of their difference apart


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
  # Both count the same rows over 500 in float64: pytest's default rel 1e-6 covers the division.
  assert got['top1'] == pytest.approx(_topk_reference(logits, labels, 1))
  assert got['top5'] == pytest.approx(_topk_reference(logits, labels, min(5, num_classes)))
  if num_classes < 5:
    assert got['top5'] == 1.0  # every label ranks in the top 5: a count of 500/500


def test_topk_accuracy_simple_case():
  logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.15, 0.1], [0.2, 0.3, 0.5]])
  got = features.topk_accuracy(logits, np.array([1, 2, 1]), ks=(1, 2))
  # Counts over 3 in float64: equal up to the rounding of 1/3 (pytest's default rel 1e-6).
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
  # The same neighbours and winners: similarity gaps at the k-th neighbour ≥ 4.3e-4 and class
  # score gaps ≥ 6e-3 relative dwarf float32's ≤ 20 eps in a cosine similarity.
  np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
  # float32 against float64: ≤ 20 eps in a similarity, times 1/T = 10 in exp's argument, 2 eps
  # for the division and exp, ≤ k eps for the sum of k positive votes (0 where no vote).
  np.testing.assert_allclose(got, want, rtol=(20 / 0.1 + 2 + min(k, 120)) * numerics.EPS32,
                             atol=0)
  acc = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes, k=k,
                              temperature=0.1, batch_size=batch_size)
  # The same winners (above), counted over 37 in float64 on both sides.
  assert acc['top1'] == pytest.approx(np.mean(want.argmax(1) == test_labels))
  assert acc['top5'] == 1.0  # 5 classes: every label is in the top 5, a count of 37/37


def test_knn_classifies_blobs():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16)) * 4
  x_train, y_train = _blobs(rng, 400, 4, 16, centres)
  x_test, y_test = _blobs(rng, 100, 4, 16, centres)
  # Centres ≥ 16 noise σ apart: measured 100 of 100, no test row within a tie of a second class.
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
  outputs = features.model_outputs(model, ('h', 'z'))
  out8, labels8 = features.extract(features.make_predict_fn(outputs, mesh8), variables,
                                   _padded_batches(images, labels, batch_size), mesh8)
  mesh1 = parallel.make_mesh(jax.devices()[:1])
  out1, labels1 = features.extract(features.make_predict_fn(outputs, mesh1), variables,
                                   _padded_batches(images, labels, batch_size), mesh1)
  feats8, feats1 = out8['h'], out1['h']
  assert out8['z'].shape == (n, 128)

  apply_h = jax.jit(lambda v, x: model.apply(v, x, train=False)['h'])
  direct = np.asarray(apply_h(variables, images))
  width = direct.shape[-1]
  assert feats8.shape == (n, width) and feats8.dtype == np.float32
  # Distinct images give distinct features: measured spread 0.36 of |h|; equal rows would
  # differ by rounding only, ≤ numerics.FEATURE_RTOL of |h|.
  assert np.std(feats8, axis=0).mean() > 1e-3 * np.abs(feats8).mean()
  np.testing.assert_array_equal(labels8, labels)  # every example once, in order
  np.testing.assert_array_equal(labels1, labels)
  # 8 devices x 1 row against 1 device x 8 rows, and each row against that image's own
  # inference-mode feature (batch composition does not matter): other float32 programs, so
  # within numerics.FEATURE_RTOL, row by row; a row out of place moves by O(1).
  for other in (feats1, direct):
    assert max(numerics.rel_err(a, b) for a, b in zip(feats8, other)) <= numerics.FEATURE_RTOL


# --- label fractions -----------------------------------------------------------------------------


def test_balanced_subset():
  rng = np.random.default_rng(0)
  counts = {0: 100, 1: 40, 2: 7, 3: 1}
  labels = rng.permutation(np.concatenate([np.full(c, k) for k, c in counts.items()]))
  sub = subsets.balanced_subset(labels, 0.1, seed=0)
  per_class = {k: int(np.sum(labels[sub] == k)) for k in counts}
  assert per_class == {0: 10, 1: 4, 2: 1, 3: 1}  # round(0.7) = 1; at least 1 for class 3
  assert len(np.unique(sub)) == len(sub)
  np.testing.assert_array_equal(sub, subsets.balanced_subset(labels, 0.1, seed=0))
  assert not np.array_equal(sub, subsets.balanced_subset(labels, 0.1, seed=1))
  np.testing.assert_array_equal(subsets.balanced_subset(labels, 1.0, seed=3),
                                np.arange(len(labels)))
  half = subsets.balanced_subset(labels, 0.5, seed=0)
  assert {k: int(np.sum(labels[half] == k)) for k in counts} == {0: 50, 1: 20, 2: 4, 3: 1}
  with pytest.raises(ValueError):
    subsets.balanced_subset(labels, 0.0, seed=0)
