"""The linear probe on frozen features, trained as the official SimCLR linear evaluation.

Official command (google-research/simclr README, "Finetuning the linear head (linear eval)"):
`--train_mode=finetune --fine_tune_after_block=4 --zero_init_logits_layer=True
--optimizer=momentum --learning_rate=0.1 --warmup_epochs=0` with --weight_decay=0.0, 100 epochs
of 512 (CIFAR-10) or 1e-6, 90 epochs of 4096 (ImageNet). So: a zero-initialised dense layer with
bias; Keras SGD with Nesterov momentum (tf2/model.py `tf.keras.optimizers.SGD(learning_rate,
FLAGS.momentum, nesterov=True)`, whose update is TF's ApplyKerasMomentum: the learning rate
enters the momentum accumulator); `weight_decay * l2_loss(v)` of every trainable variable, kernel
and bias (tf2/model.py `add_weight_decay`, non-LARS branch); lr = 0.1 × B/256, cosine to 0 without
warm-up over `N * epochs // B + 1` steps (tf2/model.py `get_train_steps`) of an endless shuffled
stream. Features can optionally be standardised with the train split's statistics (not
official; off by default).
"""
import dataclasses
import functools
from typing import Any, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from simclr_jax import optim

# Epsilon of the optional feature standardisation (the encoder's BatchNorm epsilon).
STANDARDISE_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What produced a probe figure; results.json records it beside the figure."""
  mode: str  # 'augmented': crop (+ flip) views every step | 'cached': features computed once
  epochs: float
  steps: int  # optimiser steps: probe.steps, or official N * epochs // batch + 1
  batch_size: int
  base_lr: float
  lr_scaling: str
  learning_rate: float  # the peak: cosine from here to 0, no warm-up
  momentum: float
  nesterov: bool
  weight_decay: float  # weight_decay * w added to every gradient (kernel and bias)
  standardise: bool
  augmentation: str
  # The train views: crop_area, flip and where they came from. Not part of the hash: the
  # compiled update functions (_step_fns, cached by Protocol) do not depend on them.
  views: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)

  def as_dict(self) -> dict[str, Any]:
    """The protocol as plain JSON values."""
    return dataclasses.asdict(self)


def resolve_views(section: ml_collections.ConfigDict, augment: ml_collections.ConfigDict
                  ) -> ml_collections.ConfigDict:
  """`section` (config.probe or config.finetune) with crop_area / flip left unset (None) taken
  from the pretraining run's `augment`, and `views_from` saying where each came from.

  Evaluation views follow the pretraining recipe: an encoder pretrained without flips, or on
  large crops only, is not judged on mirrored or tiny crops it never learnt to read.
  """
  resolved = ml_collections.ConfigDict(section.to_dict())
  origin = {}
  for key in ('crop_area', 'flip'):
    if resolved[key] is None:
      resolved[key] = augment[key]
      origin[key] = f'pretraining augment.{key}'
    else:
      origin[key] = 'evaluation config'
  resolved.crop_area = tuple(float(a) for a in resolved.crop_area)
  resolved.flip = bool(resolved.flip)
  resolved.views_from = origin
  return resolved


def views_record(section: ml_collections.ConfigDict) -> dict[str, Any]:
  """The resolved views of `section` as results.json records them."""
  return {'crop_area': list(section.crop_area), 'flip': bool(section.flip),
          'from': dict(section.views_from)}


def augmentation_text(section: ml_collections.ConfigDict) -> str:
  """E.g. 'random resized crop, area (0.08, 1.0) + horizontal flip'."""
  text = f'random resized crop, area {tuple(section.crop_area)}'
  return text + (' + horizontal flip' if section.flip else '')


def protocol(probe: ml_collections.ConfigDict, num_examples: int,
             mode: str | None = None) -> Protocol:
  """The protocol of the resolved `config.probe` (resolve_views applied) on `num_examples`."""
  mode = probe.mode if mode is None else mode
  augmented = mode == 'augmented'
  return Protocol(
      mode=mode, epochs=float(probe.epochs), steps=optim.train_steps(num_examples, probe),
      batch_size=int(probe.batch_size), base_lr=float(probe.base_lr),
      lr_scaling=probe.lr_scaling,
      learning_rate=optim.scaled_learning_rate(probe.base_lr, probe.batch_size,
                                               probe.lr_scaling),
      momentum=float(probe.momentum), nesterov=bool(probe.nesterov),
      weight_decay=float(probe.weight_decay), standardise=bool(probe.standardise),
      augmentation=augmentation_text(probe) if augmented else 'none (eval view)',
      views=views_record(probe) if augmented else {})


def keras_momentum(schedule: optax.ScalarOrSchedule, momentum: float, nesterov: bool,
                   weight_decay: float, mask: Any = None) -> optax.GradientTransformation:
  """Official --optimizer=momentum with add_weight_decay: Keras SGD, decay in the gradient.

  accum = m·accum - lr·(g + wd·w); w += m·accum - lr·(g + wd·w) (Nesterov) or w += accum,
  as TF's ApplyKerasMomentum: the learning rate is applied inside the accumulator, so past
  gradients keep the learning rate of their step.
  """
  return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask),
                     optax.scale_by_learning_rate(schedule),
                     optax.trace(decay=momentum, nesterov=nesterov))


def make_optimizer(p: Protocol) -> optax.GradientTransformation:
  """The probe's optimiser: keras_momentum on every variable, cosine without warm-up."""
  return keras_momentum(optim.warmup_cosine(p.learning_rate, 0, p.steps), p.momentum,
                        p.nesterov, p.weight_decay)


def init_params(dim: int, num_classes: int) -> dict[str, np.ndarray]:
  """The zero-initialised dense layer (official --zero_init_logits_layer=True)."""
  return {'kernel': np.zeros((dim, num_classes), np.float32),
          'bias': np.zeros((num_classes,), np.float32)}


def standardisation(feats: Any) -> dict[str, np.ndarray]:
  """{'mean', 'var'} of the train features, per dimension (a non-learned BN)."""
  feats = np.asarray(feats, np.float64)
  return {'mean': feats.mean(0).astype(np.float32), 'var': feats.var(0).astype(np.float32)}


def predict_linear_probe(params: Mapping[str, Any], feats: Any) -> jax.Array:
  """Logits; `params` standardises the features first when it carries 'mean' and 'var'."""
  x = jnp.asarray(feats, jnp.float32)
  if 'mean' in params:
    x = (x - params['mean']) * jax.lax.rsqrt(params['var'] + STANDARDISE_EPSILON)
  return x @ params['kernel'] + params['bias']


def index_batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
  """Endless batches of example indices: epoch e is a permutation seeded by (seed, e).

  Batches cross epoch boundaries (no remainder is dropped), as the official shuffled, repeated
  input; every example comes once per epoch.
  """
  carry, epoch = np.zeros((0,), np.int64), 0
  while True:
    while len(carry) < batch_size:
      carry = np.concatenate([carry, np.random.default_rng([seed, epoch]).permutation(n)])
      epoch += 1
    yield carry[:batch_size]
    carry = carry[batch_size:]


@functools.lru_cache(maxsize=8)
def _step_fns(p: Protocol) -> tuple[optax.GradientTransformation, Any, Any]:
  """(tx, jitted update on a batch, jitted update on cached features by index): compiled once."""
  tx = make_optimizer(p)

  def update(trainable, opt_state, stats, x, y):
    def loss_fn(trainable):
      logits = predict_linear_probe({**stats, **trainable}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  def update_cached(trainable, opt_state, stats, feats, labels, idx):
    # Features are arguments, never closed-over constants (they can be gigabytes).
    return update(trainable, opt_state, stats, feats[idx], labels[idx])

  return tx, jax.jit(update), jax.jit(update_cached)


def train_cached(feats: Any, labels: Any, num_classes: int, p: Protocol, seed: int
                 ) -> dict[str, np.ndarray]:
  """Trains the probe on features computed once; returns {'kernel', 'bias'[, 'mean', 'var']}.

  Step t uses batch t of index_batches(N, B, seed), for p.steps steps.
  """
  feats = jnp.asarray(feats, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  if feats.ndim != 2 or labels.shape != feats.shape[:1]:
    raise ValueError(f'features {feats.shape} and labels {labels.shape} do not match.')
  stats = standardisation(feats) if p.standardise else {}
  tx, _, update_cached = _step_fns(p)
  trainable = init_params(feats.shape[1], num_classes)
  opt_state = tx.init(trainable)
  batches = index_batches(feats.shape[0], p.batch_size, seed)
  for _ in range(p.steps):
    trainable, opt_state, _ = update_cached(trainable, opt_state, stats, feats, labels,
                                            next(batches))
  return {**stats, **jax.tree.map(np.asarray, trainable)}


def train_streamed(batches: Iterable[tuple[np.ndarray, np.ndarray]], dim: int, num_classes: int,
                   p: Protocol, stats: Mapping[str, np.ndarray] | None = None
                   ) -> dict[str, np.ndarray]:
  """Trains the probe on p.steps (features, labels) host batches of a stream.

  The augmented path: each batch holds the features of fresh views through the frozen encoder,
  gathered to every process, so the update runs on one device without collectives, the same
  on every process. `stats`: standardisation statistics to apply (fixed), or None.
  """
  stats = dict(stats or {})
  tx, update, _ = _step_fns(p)
  trainable = init_params(dim, num_classes)
  opt_state = tx.init(trainable)
  steps = 0
  for _, (x, y) in zip(range(p.steps), batches):  # range first: no batch is drawn past the end
    trainable, opt_state, _ = update(trainable, opt_state, stats, x, y)
    steps += 1
  if steps < p.steps:
    raise ValueError(f'the probe stream ended after {steps} of {p.steps} steps.')
  return {**stats, **jax.tree.map(np.asarray, trainable)}
