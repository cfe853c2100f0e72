"""Frozen-feature extraction on the mesh and top-k accuracy, shared by every evaluator.

`make_feature_fn` is the one jitted inference forward (batch sharded on "data");
`extract_features` runs it over a padded, per-process input and gathers every real row on every
process, so each example counts exactly once on any number of devices and processes.
"""
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from simclr_jax import parallel

FeatureFn = Callable[[Any, jax.Array], jax.Array]

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
