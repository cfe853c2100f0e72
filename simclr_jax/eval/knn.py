"""Weighted kNN on L2-normalised frozen features (the InstDisc monitor SimCLR codes report)."""
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax import losses
from simclr_jax.eval.features import topk_accuracy

# --- kNN -----------------------------------------------------------------------------------------


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
  train = losses.l2_normalize(jnp.asarray(train_feats, jnp.float32))
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
    out = _knn_chunk(train, train_labels, losses.l2_normalize(jnp.asarray(chunk)),
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
