"""Fine-tuning of a pretrained encoder on a label fraction of the train split (issue 5).

The official SimCLR fine-tune recipe: a zero-initialised linear head on h, trained with the
encoder (whole, or from a chosen block on) by Nesterov-momentum SGD on cross-entropy with a
cosine schedule, on random-resized-crop + flip views re-drawn every epoch. Trained parts run
BN in train mode (batch statistics, running averages updated); frozen parts keep their
parameters and run BN in inference mode. Each epoch sees the examples in a seeded order. The
label subset is balanced_subset of the
train labels: fixed, seeded and class-balanced.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from simclr_jax import optim, parallel
from simclr_jax.eval import features
from simclr_jax.data import host_input, sources
from simclr_jax.models import resnet, simclr

HEAD = 'head'
NUM_STAGES = 4  # every ResNet depth in resnet.STAGES has four stages


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


def is_frozen(name: str, from_block: int) -> bool:
  """Whether the encoder's top-level part `name` ('stem_bn', 'stage2_block1', ...) is frozen."""
  if name.startswith('stem'):
    return from_block >= 1
  if name.startswith('stage'):
    return int(name[len('stage'):].split('_')[0]) < from_block
  raise ValueError(f'unknown encoder part {name!r}.')


def split_params(encoder_params: dict[str, Any], from_block: int
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(frozen, trained) top-level parts of the encoder's parameters."""
  frozen = {k: v for k, v in encoder_params.items() if is_frozen(k, from_block)}
  trained = {k: v for k, v in encoder_params.items() if not is_frozen(k, from_block)}
  return frozen, trained


def label_subset(cfg: ml_collections.ConfigDict, fraction: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(example ids, labels) of the seeded class-balanced `fraction` of cfg.data.train_split.

  Every process reads the whole split's ids and labels (no images needed for TFDS JPEGs)
  and computes the same subset.
  """
  src = sources.load(cfg.data, cfg.data.train_split, process_index=0, process_count=1)
  ds = src.ds.map(lambda ex: (ex['index'], ex['label'])).batch(4096)
  ids, labels = [], []
  for i, y in ds.as_numpy_iterator():
    ids.append(i)
    labels.append(y)
  ids, labels = np.concatenate(ids).astype(np.int64), np.concatenate(labels).astype(np.int32)
  if not len(labels) or labels.min() < 0 or labels.max() >= cfg.data.num_classes:
    raise ValueError(f'split {cfg.data.train_split!r} needs labels in '
                     f'[0, {cfg.data.num_classes}) for fine-tuning.')
  chosen = balanced_subset(labels, fraction, seed)
  return ids[chosen], labels[chosen]


def make_optimizer(ft: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
  """Nesterov momentum SGD, cosine schedule without warm-up, decay on kernels only."""
  schedule = optim.warmup_cosine(float(ft.learning_rate), 0, total_steps)
  return optax.chain(optax.add_decayed_weights(float(ft.weight_decay), mask=optim.decay_mask),
                     optax.sgd(schedule, momentum=float(ft.momentum),
                               nesterov=bool(ft.nesterov)))


def make_train_step(module: resnet.ResNet, tx: optax.GradientTransformation, mesh: Mesh
                    ) -> Callable[..., Any]:
  """Jitted step (trained, opt_state, frozen, batch_stats, batch) → (same three, loss).

  `trained` = {'encoder': trained parts, 'head': {'kernel', 'bias'}}; `frozen` parts are an
  argument, never differentiated nor updated. Padded rows (mask 0) are left out of the loss
  and, so the BN batch statistics see only real images, replaced by real rows of the batch;
  a batch with no real row changes nothing.
  """

  def step(trained, opt_state, frozen, batch_stats, batch):
    mask = batch['mask'].astype(bool)
    n = mask.shape[0]
    n_real = jnp.sum(mask.astype(jnp.int32))
    real_first = jnp.argsort(~mask, stable=True)
    fill = real_first[jnp.arange(n) % jnp.maximum(n_real, 1)]
    images = batch['image'][jnp.where(mask, jnp.arange(n), fill)]
    labels = jnp.maximum(batch['label'], 0)
    weights = mask.astype(jnp.float32)

    def loss_fn(trained):
      params = {**frozen, **trained['encoder']}
      h, new = module.apply({'params': params, 'batch_stats': batch_stats}, images,
                            train=True, mutable=['batch_stats'])
      logits = h @ trained[HEAD]['kernel'] + trained[HEAD]['bias']
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return jnp.sum(ce * weights) / jnp.maximum(n_real, 1), new['batch_stats']

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    updates, new_opt = tx.update(grads, opt_state, trained)
    new_trained = optax.apply_updates(trained, updates)
    ok = n_real > 0
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa
    return (keep(new_trained, trained), keep(new_opt, opt_state),
            keep(new_stats, batch_stats), loss)

  rep = parallel.replicated(mesh)
  return jax.jit(step, out_shardings=(rep, rep, rep, rep))


def make_logits_fn(module: resnet.ResNet, mesh: Mesh) -> features.FeatureFn:
  """Jitted inference-mode logits of the fine-tuned network, batch sharded on "data"."""

  def logits(variables, images):
    h = module.apply({'params': variables['params'], 'batch_stats': variables['batch_stats']},
                     images, train=False)
    return h @ variables[HEAD]['kernel'] + variables[HEAD]['bias']

  return jax.jit(logits, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=parallel.batch_sharded(mesh))


def finetune(variables: Any, model_cfg: ml_collections.ConfigDict,
             cfg: ml_collections.ConfigDict, ft: ml_collections.ConfigDict, mesh: Mesh,
             eval_batch_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """Fine-tunes the encoder of `variables` (a SimCLR {'params','batch_stats'}) per `ft`.

  `cfg` is the data config (cfg.seed seeds the subset, the epoch orders and the views).
  Returns (results {'top1','top5','label_fraction','num_train_examples','from_block'} on
  cfg.data.eval_split, the fine-tuned encoder's {'params','batch_stats','head'}).
  """
  fraction, from_block = float(ft.label_fraction), int(ft.from_block)
  num_classes = cfg.data.num_classes
  module = resnet.ResNet(model_cfg.depth, model_cfg.width, model_cfg.cifar_stem,
                         simclr.compute_dtype(model_cfg), train_from_stage=from_block)
  ids, _ = label_subset(cfg, fraction, cfg.seed)
  indices = None if fraction >= 1.0 else ids  # 100%: the unfiltered pipeline
  total = host_input.num_examples(cfg)
  steps_per_epoch = host_input.probe_num_batches(total, ft.batch_size, jax.process_count(),
                                               None if indices is None else len(ids))
  tx = make_optimizer(ft, int(ft.epochs) * steps_per_epoch)

  host = jax.tree.map(np.asarray, {'params': variables['params']['encoder'],
                                   'batch_stats': variables['batch_stats']['encoder']})
  frozen, trained_enc = split_params(host['params'], from_block)
  dim = resnet.feature_dim(model_cfg.depth, model_cfg.width)
  trained = {'encoder': trained_enc,
             HEAD: {'kernel': np.zeros((dim, num_classes), np.float32),
                    'bias': np.zeros((num_classes,), np.float32)}}
  trained, frozen, batch_stats = parallel.replicate((trained, frozen, host['batch_stats']), mesh)
  opt_state = parallel.replicate(jax.tree.map(np.asarray, tx.init(trained)), mesh)
  step = make_train_step(module, tx, mesh)
  for e in range(int(ft.epochs)):
    for batch in host_input.probe_train_iterator(cfg, ft.batch_size, epoch=e,
                                               crop_area=tuple(ft.crop_area), flip=ft.flip,
                                               indices=indices, shuffle=True):
      arrays = parallel.host_batch_to_global(
          {k: batch[k] for k in ('image', 'label', 'mask')}, mesh)
      trained, opt_state, batch_stats, _ = step(trained, opt_state, frozen, batch_stats, arrays)

  tuned = {'params': {**frozen, **trained['encoder']}, 'batch_stats': batch_stats,
           HEAD: trained[HEAD]}
  logits, labels = features.extract_features(
      make_logits_fn(module, mesh), tuned,
      host_input.eval_iterator(cfg, cfg.data.eval_split, eval_batch_size), mesh)
  acc = features.topk_accuracy(logits, labels)
  results = {'top1': acc['top1'], 'top5': acc['top5'], 'label_fraction': fraction,
             'num_train_examples': int(len(ids)), 'from_block': from_block}
  return results, tuned
