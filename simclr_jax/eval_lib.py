"""Evaluation maths: frozen-feature extraction, linear probe, kNN, top-k and label fractions.

Pure functions, wired into the evaluation job (`evaluate.py`) separately. The protocol follows
the official SimCLR linear evaluation: features h of the frozen encoder (BN in inference mode),
a non-learned standardisation of the features (BN without scale/centre, here with the train-set
statistics), then one dense layer trained with momentum SGD and a cosine schedule.
"""
import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from simclr_jax import optim
from simclr_jax import parallel

FeatureFn = Callable[[Any, jax.Array], jax.Array]

# Epsilon of the feature standardisation (same as the encoder's BatchNorm).
STANDARDISE_EPSILON = 1e-5


# --- features ------------------------------------------------------------------------------------


def make_feature_fn(model: nn.Module, mesh: Mesh) -> FeatureFn:
  """Jitted encoder forward in inference mode: (variables, images sharded on "data") → h."""

  def features(variables: Any, images: jax.Array) -> jax.Array:
    return model.apply(variables, images, train=False)['h'].astype(jnp.float32)

  return jax.jit(features,
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=parallel.batch_sharded(mesh))


def extract_features(feature_fn: FeatureFn, variables: Any,
                     batches: Iterable[Mapping[str, np.ndarray]],
                     mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of every row with a true 'mask', gathered so every process has all.

  Each batch is this process's numpy slice {'image', 'label', 'mask'}; padded rows (mask 0) are
  dropped, so a padded eval set counts each example exactly once. Rows come back in global batch
  order (process 0's rows of a batch, then process 1's, ...), batch after batch.
  """
  variables = jax.device_put(variables, parallel.replicated(mesh))
  feats, labels = [], []
  for batch in batches:
    arrays = parallel.host_batch_to_global(
        {k: batch[k] for k in ('image', 'label', 'mask')}, mesh)
    h = feature_fn(variables, arrays['image'])
    h, label, mask = multihost_utils.process_allgather(
        (h, arrays['label'], arrays['mask']), tiled=True)
    keep = np.asarray(mask).astype(bool)
    feats.append(np.asarray(h, np.float32)[keep])
    labels.append(np.asarray(label)[keep])
  if not feats:
    raise ValueError('extract_features got no batches.')
  return np.concatenate(feats), np.concatenate(labels).astype(np.int32)


# --- top-k accuracy ------------------------------------------------------------------------------


def topk_accuracy(logits: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """{'top1': ..., 'top5': ...} as fractions in [0, 1]; k is capped at the number of classes.

  An example counts as correct at k when fewer than k classes score strictly higher than its
  label (ties resolve in the example's favour).
  """
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels).astype(np.int64)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f'logits {logits.shape} and labels {labels.shape} do not match.')
  if not len(labels):
    raise ValueError('topk_accuracy got no examples.')
  label_score = np.take_along_axis(logits, labels[:, None], axis=1)
  rank = np.sum(logits > label_score, axis=1)  # 0 = the label has the highest score
  num_classes = logits.shape[1]
  return {f'top{k}': float(np.mean(rank < min(k, num_classes))) for k in ks}


# --- linear probe --------------------------------------------------------------------------------


def _standardise(params: Mapping[str, jax.Array], feats: jax.Array) -> jax.Array:
  """Non-learned BN: (x - train mean) / sqrt(train var + eps)."""
  return (feats - params['mean']) * jax.lax.rsqrt(params['var'] + STANDARDISE_EPSILON)


def predict_linear_probe(params: Mapping[str, Any], feats: Any) -> jax.Array:
  """Logits of the linear probe; `params` carries its own standardisation statistics."""
  x = _standardise(params, jnp.asarray(feats, jnp.float32))
  return x @ params['kernel'] + params['bias']


def train_linear_probe(train_feats: Any, train_labels: Any, num_classes: int, *, epochs: int,
                       batch_size: int, learning_rate: float, momentum: float = 0.9,
                       nesterov: bool = False, weight_decay: float = 0.0,
                       seed: int = 0) -> dict[str, jax.Array]:
  """Trains standardise → Dense(num_classes) on cached features with cross-entropy.

  Momentum SGD (optionally Nesterov) with the project's cosine schedule (no warm-up) over
  `epochs` passes; each epoch is a seeded shuffle in batches of `batch_size` (the remainder
  is dropped). Weight decay (L2 added to the gradient) applies to the kernel only. The kernel
  starts at zero, as in the official SimCLR linear head. Returns {'mean', 'var', 'kernel',
  'bias'}.
  """
  feats = jnp.asarray(train_feats, jnp.float32)
  labels = jnp.asarray(train_labels, jnp.int32)
  n, dim = feats.shape
  if labels.shape != (n,):
    raise ValueError(f'train_feats {feats.shape} and train_labels {labels.shape} do not match.')
  if epochs < 1 or batch_size < 1:
    raise ValueError(f'epochs={epochs} and batch_size={batch_size} must be >= 1.')
  batch_size = min(batch_size, n)
  epoch_fn, tx = probe_epoch_fn(n // batch_size, batch_size, epochs, float(learning_rate),
                                 float(momentum), bool(nesterov), float(weight_decay))
  stats = {'mean': jnp.mean(feats, axis=0), 'var': jnp.var(feats, axis=0)}
  trainable = {'kernel': jnp.zeros((dim, num_classes), jnp.float32),
               'bias': jnp.zeros((num_classes,), jnp.float32)}
  opt_state = tx.init(trainable)
  key = jax.random.key(seed)
  for e in range(epochs):
    trainable, opt_state = epoch_fn(trainable, opt_state, stats, feats, labels,
                                    jax.random.fold_in(key, e))
  return {**stats, **trainable}


@functools.lru_cache(maxsize=8)
def probe_epoch_fn(steps_per_epoch: int, batch_size: int, epochs: int, learning_rate: float,
                   momentum: float, nesterov: bool, weight_decay: float
                   ) -> tuple[Callable[..., Any], optax.GradientTransformation]:
  """The probe's optimiser and its jitted epoch (cached: equal settings compile once)."""
  schedule = optim.warmup_cosine(learning_rate, 0, epochs * steps_per_epoch)
  tx = optax.chain(
      optax.add_decayed_weights(weight_decay, mask={'kernel': True, 'bias': False}),
      optax.sgd(schedule, momentum=momentum, nesterov=nesterov))

  def loss_fn(trainable, stats, x, y):
    logits = predict_linear_probe({**stats, **trainable}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def epoch(trainable, opt_state, stats, feats, labels, key):
    # Features are arguments, never closed-over constants (they can be gigabytes).
    def step(carry, idx):
      trainable, opt_state = carry
      grads = jax.grad(loss_fn)(trainable, stats, feats[idx], labels[idx])
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return (optax.apply_updates(trainable, updates), opt_state), None

    order = jax.random.permutation(key, feats.shape[0])[:steps_per_epoch * batch_size]
    (trainable, opt_state), _ = jax.lax.scan(
        step, (trainable, opt_state), order.reshape(steps_per_epoch, batch_size))
    return trainable, opt_state

  return epoch, tx


# --- kNN -----------------------------------------------------------------------------------------


def _l2_normalise(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (zero rows stay zero)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def _knn_chunk(train_feats: jax.Array, train_labels: jax.Array, test_feats: jax.Array,
               temperature: float, *, k: int, num_classes: int) -> jax.Array:
  """Class scores of one chunk of (normalised) test rows against all (normalised) train rows."""
  sim = test_feats @ train_feats.T  # [chunk, n_train] cosine similarities
  top_sim, top_idx = jax.lax.top_k(sim, k)
  weights = jnp.exp(top_sim / temperature)
  votes = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=jnp.float32)
  return jnp.einsum('bk,bkc->bc', weights, votes)


def knn_predict(train_feats: Any, train_labels: Any, test_feats: Any, num_classes: int,
                k: int = 200, temperature: float = 0.1, batch_size: int = 256) -> np.ndarray:
  """Class scores [n_test, num_classes] of the weighted kNN classifier (InstDisc monitor).

  Features are L2-normalised; each test row's k nearest train rows by cosine similarity vote
  for their label with weight exp(sim / temperature). k is capped at the number of train rows;
  test rows are processed `batch_size` at a time so memory is O(batch_size × n_train).
  """
  train = _l2_normalise(jnp.asarray(train_feats, jnp.float32))
  train_labels = jnp.asarray(train_labels, jnp.int32)
  test = np.asarray(test_feats, np.float32)
  n_test = test.shape[0]
  k = min(k, train.shape[0])
  if k < 1:
    raise ValueError('knn_predict needs at least one train example and k >= 1.')
  batch_size = max(1, min(batch_size, n_test))
  scores = []
  for start in range(0, n_test, batch_size):
    chunk = test[start:start + batch_size]
    rows = chunk.shape[0]
    if rows < batch_size:  # pad the last chunk: one compiled shape for every chunk
      chunk = np.concatenate([chunk, np.zeros((batch_size - rows, chunk.shape[1]), np.float32)])
    out = _knn_chunk(train, train_labels, _l2_normalise(jnp.asarray(chunk)),
                     jnp.float32(temperature), k=k, num_classes=num_classes)
    scores.append(np.asarray(out)[:rows])
  if not scores:
    return np.zeros((0, num_classes), np.float32)
  return np.concatenate(scores)


def knn_accuracy(train_feats: Any, train_labels: Any, test_feats: Any, test_labels: Any,
                 num_classes: int, k: int = 200, temperature: float = 0.1,
                 batch_size: int = 256, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """Top-k accuracies ({'top1', 'top5'}) of the weighted kNN classifier on the test set."""
  scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k=k,
                       temperature=temperature, batch_size=batch_size)
  return topk_accuracy(scores, test_labels, ks)


# --- label fractions -----------------------------------------------------------------------------


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
