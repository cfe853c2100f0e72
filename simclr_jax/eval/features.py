"""Inference on the mesh over a padded input, and accuracies: shared by every evaluator.

`make_predict_fn` is the one jitted inference forward (variables replicated, batch and outputs
sharded on "data"); `gathered` runs it over a per-process padded input (rows with mask False are
padding) and gathers every real row on every process, so each example counts exactly once on any
number of devices and processes; `extract` concatenates what it gathers.
"""
import functools
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

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
def outputs_fn(model: nn.Module, mesh: Mesh, names: tuple[str, ...],
               prepare: Callable[[jax.Array], jax.Array] | None = None) -> PredictFn:
  """The one jitted inference forward: {name: output} of `names` ('h', 'z', 'probe_logits'),
  after `prepare(images)` when the eval views are made on the devices. Cached, so every
  evaluator, every evaluation round, a second job in the process and the random-encoder
  baseline share one compilation."""
  outputs = model_outputs(model, names)
  if prepare is None:
    return make_predict_fn(outputs, mesh)
  return make_predict_fn(lambda v, x: outputs(v, prepare(x)), mesh)


def gathered(predict_fn: PredictFn, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
             mesh: Mesh, keys: Sequence[str] = ('label',)
             ) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
  """Per batch: (outputs, {key: column}) of its rows with a true 'mask', on every process.

  Each batch is this process's numpy slice {'image', 'mask', *keys}; padded rows are dropped, so
  a padded input counts each example exactly once. Outputs have predict_fn's structure with
  numpy leaves; rows come in global batch order (process 0's rows, then process 1's, ...).
  """
  variables = jax.device_put(variables, parallel.replicated_sharding(mesh))
  names = ('image', 'mask', *keys)
  for batch in batches:
    arrays = parallel.host_batch_to_global({k: batch[k] for k in names}, mesh)
    out = predict_fn(variables, arrays['image'])
    out, columns = multihost_utils.process_allgather(
        (out, {k: arrays[k] for k in ('mask', *keys)}), tiled=True)
    keep = np.asarray(columns.pop('mask')).astype(bool)
    yield (jax.tree.map(lambda x: np.asarray(x)[keep], out),
           {k: np.asarray(v)[keep] for k, v in columns.items()})


def extract(predict_fn: PredictFn, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
            mesh: Mesh) -> tuple[Any, np.ndarray]:
  """(outputs, labels) of every real row of `batches` (see `gathered`), concatenated."""
  parts = list(gathered(predict_fn, variables, batches, mesh))
  if not parts:
    raise ValueError('extract got no batches.')
  outs, columns = zip(*parts)
  return (jax.tree.map(lambda *xs: np.concatenate(xs), *outs),
          np.concatenate([c['label'] for c in columns]).astype(np.int32))


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
