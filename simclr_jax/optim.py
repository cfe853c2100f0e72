"""Official SimCLR's LARS, its warm-up + cosine schedule, step counts and learning-rate scaling.

One LARS for every parameter, as official `build_optimizer`: BN parameters and biases
(official exclude_from_weight_decay=['batch_normalization', 'bias', 'head_supervised'], which
also excludes them from the trust ratio) get neither weight decay nor the trust ratio. The online
probe (official 'head_supervised') is excluded from both too, so it trains with plain classic
momentum at the encoder's learning rate and schedule; official `add_weight_decay` puts
`weight_decay * l2_loss(kernel)` of the probe's kernel (not its bias) into the loss, i.e. adds
weight_decay * kernel to its gradient, which is what this optimiser does.
"""
import math
from typing import Any

import jax
import ml_collections
import optax

from simclr_jax.errors import ConfigError
from simclr_jax.models.simclr import PROBE


def scaled_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
  """base_lr × batch/256 ('linear') or base_lr × sqrt(batch) ('sqrt'), as in the paper, or
  base_lr as given ('none', as the official distillation colab's `learning_rate = 2.0`)."""
  if scaling == 'none':
    return base_lr
  if scaling == 'linear':
    return base_lr * batch_size / 256.0
  if scaling == 'sqrt':
    return base_lr * math.sqrt(batch_size)
  raise ConfigError(f"config.optim.lr_scaling='{scaling}' must be 'linear', 'sqrt' or 'none'.")


def train_steps(num_examples: int, train_cfg: ml_collections.ConfigDict) -> int:
  """config.train.steps if positive, else official get_train_steps: N × epochs // B + 1."""
  if train_cfg.steps > 0:
    return int(train_cfg.steps)
  return int(num_examples * train_cfg.epochs // train_cfg.batch_size) + 1


def warmup_steps(warmup_epochs: float, num_examples: int, batch_size: int) -> int:
  """Official WarmUpAndCosineDecay: int(round(warmup_epochs × N // B)) (floor, then round)."""
  return int(round(warmup_epochs * num_examples // batch_size))


def warmup_cosine(peak: float, warmup: int, total: int) -> optax.Schedule:
  """Linear warm-up step/warmup × peak (0 at step 0), then cosine from peak to 0 at `total`.

  Official WarmUpAndCosineDecay with CosineDecay(peak, total - warmup). A run shorter than its
  warm-up stays on the warm-up line, as official; the cosine part then is never reached.
  """
  # join_schedules rather than warmup_cosine_decay_schedule: that one rejects a run that is all
  # warm-up (short test and smoke runs).
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup, 1)),
       optax.cosine_decay_schedule(peak, max(total - warmup, 1))],
      boundaries=[warmup])


def decay_mask(params: Any) -> Any:
  """True for conv/dense kernels, False for BN parameters and biases (the official name rule)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def trust_ratio_mask(params: Any) -> Any:
  """decay_mask without the online probe: the kernels that get LARS's trust ratio."""
  return {k: jax.tree.map(lambda _: False, v) if k == PROBE else decay_mask(v)
          for k, v in params.items()}


def make_optimizer(optim_cfg: ml_collections.ConfigDict, batch_size: int, num_examples: int,
                   num_steps: int, *, probe_trust_ratio: bool = False
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Official LARS from `config.optim` over `num_steps` steps; returns (tx, lr schedule).

  optax.lars applies weight decay, the trust ratio, the learning rate, then the momentum trace:
  t = m·t - lr·trust·(g + wd·w) and w += t, which is official classic momentum
  (v = m·v + lr·trust·grad; w -= v) with t = -v. Kernels of the probe get the weight decay
  (their official l2 term) without the trust ratio, unless `probe_trust_ratio` (the
  distillation colab's student, whose LARS excludes only 'batch_normalization' and 'bias').
  """
  peak = scaled_learning_rate(optim_cfg.base_lr, batch_size, optim_cfg.lr_scaling)
  lr = warmup_cosine(peak, warmup_steps(optim_cfg.warmup_epochs, num_examples, batch_size),
                     num_steps)
  tx = optax.lars(lr, weight_decay=optim_cfg.weight_decay, weight_decay_mask=decay_mask,
                  trust_coefficient=optim_cfg.trust_coefficient, eps=0.0,
                  trust_ratio_mask=decay_mask if probe_trust_ratio else trust_ratio_mask,
                  momentum=optim_cfg.momentum)
  return tx, lr
