"""The linear probe on frozen features: standardise, one dense layer, momentum SGD, cosine.

The protocol follows the official SimCLR linear evaluation: a zero-initialised dense layer
trained with (Nesterov) momentum SGD and a cosine schedule without warm-up; the features may be
standardised with the train-set statistics (a non-learned BN).
"""
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from simclr_jax import optim

# Epsilon of the feature standardisation (same as the encoder's BatchNorm).
STANDARDISE_EPSILON = 1e-5

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
