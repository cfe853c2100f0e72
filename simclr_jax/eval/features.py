"""Inference on the mesh over a padded input, and accuracies: shared by every evaluator.

`make_predict_fn` is the one jitted inference forward (variables replicated, batch and outputs
sharded on "data"); `extract` runs it over a per-process padded input (rows with mask False are
padding) and gathers every real row on every process, so each example counts exactly once on any
number of devices and processes.
"""
import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from simclr_jax import parallel

# (variables, images [b, H, W, 3]) -> a pytree of [b, ...] arrays.
PredictFn = Callable[[Any, jax.Array], Any]
FEATURES = ('h', 'z')  # what the evaluation and extract jobs read: encoder or projection output


def model_outputs(model: nn.Module, names: Sequence[str] = ('h',)) -> PredictFn:
  """The SimCLR model in inference mode (BN statistics frozen), keeping outputs `names` in f32."""
  names = tuple(names)

  def apply(variables: Any, images: jax.Array) -> dict[str, jax.Array]:
    out = model.apply(variables, images, train=False)
    return {k: out[k].astype(jnp.float32) for k in names}

  return apply


def make_predict_fn(apply_fn: PredictFn, mesh: Mesh) -> PredictFn:
  """`apply_fn` jitted for `mesh`: variables replicated; images and every output sharded."""
  return jax.jit(apply_fn,
                 in_shardings=(parallel.replicated_sharding(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=parallel.batch_sharded(mesh))


@functools.lru_cache(maxsize=4)
def feature_fn(model: nn.Module, mesh: Mesh, feature: str) -> PredictFn:
  """The jitted inference forward returning the one output `feature` ('h' or 'z'); cached, so a
  second job in the process (or the random-encoder baseline) reuses its compilation."""
  outputs = model_outputs(model, (feature,))
  return make_predict_fn(lambda v, x: outputs(v, x)[feature], mesh)


def extract(predict_fn: PredictFn, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
            mesh: Mesh) -> tuple[Any, np.ndarray]:
  """(outputs, labels) of every row with a true 'mask', gathered so every process has all.

  Each batch is this process's numpy slice {'image', 'label', 'mask'}; padded rows are dropped,
  so a padded input counts each example exactly once. `outputs` has predict_fn's structure with
  numpy leaves [n, ...]; rows come in global batch order (process 0's rows of a batch, then
  process 1's, ...), batch after batch.
  """
  variables = jax.device_put(variables, parallel.replicated_sharding(mesh))
  outs, labels = [], []
  for batch in batches:
    arrays = parallel.host_batch_to_global(
        {k: batch[k] for k in ('image', 'label', 'mask')}, mesh)
    out = predict_fn(variables, arrays['image'])
    out, label, mask = multihost_utils.process_allgather(
        (out, arrays['label'], arrays['mask']), tiled=True)
    keep = np.asarray(mask).astype(bool)
    outs.append(jax.tree.map(lambda x: np.asarray(x)[keep], out))
    labels.append(np.asarray(label)[keep])
  if not outs:
    raise ValueError('extract got no batches.')
  return (jax.tree.map(lambda *xs: np.concatenate(xs), *outs),
          np.concatenate(labels).astype(np.int32))


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


def per_class_accuracy(logits: Any, labels: Any,
                       class_names: Sequence[str] | None = None) -> dict[str, float]:
  """{class: top-1 accuracy on its examples} for each class present in `labels`.

  Keys are class names when given, else the class index as a string (JSON keys). A prediction
  counts as correct when no class scores strictly higher than the label, as in
  topk_accuracy, so the count-weighted mean of these is its top1.
  """
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels).astype(np.int64)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f'logits {logits.shape} and labels {labels.shape} do not match.')
  correct = np.sum(logits > np.take_along_axis(logits, labels[:, None], axis=1), axis=1) == 0
  out = {}
  for c in np.unique(labels):
    key = class_names[c] if class_names is not None else str(int(c))
    out[key] = float(np.mean(correct[labels == c]))
  return out
