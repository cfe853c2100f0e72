"""LARS with SimCLR's masks, the warm-up + cosine schedule and learning-rate scaling.

BN parameters and biases get neither weight decay nor the trust ratio (official SimCLR's
EXCLUDE_FROM_WEIGHT_DECAY); the online probe head gets plain momentum SGD so its own learning
rate cannot disturb the encoder's LARS dynamics.
"""
import math
from typing import Any

import jax
import ml_collections
import optax

PROBE = 'probe'  # top-level parameter collection of the online probe (models/simclr.py)


def scaled_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
  """base_lr × batch/256 ('linear') or base_lr × sqrt(batch) ('sqrt'), as in the paper."""
  if scaling == 'linear':
    return base_lr * batch_size / 256.0
  if scaling == 'sqrt':
    return base_lr * math.sqrt(batch_size)
  raise ValueError(f"config.optim.lr_scaling='{scaling}' must be 'linear' or 'sqrt'.")


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at the end."""
  warmup_steps = min(warmup_steps, total_steps)
  # join_schedules rather than warmup_cosine_decay_schedule: that one rejects a run that is all
  # warm-up (short test and smoke runs), this one just never reaches the cosine part.
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
       optax.cosine_decay_schedule(peak, max(total_steps - warmup_steps, 1))],
      boundaries=[warmup_steps])


def decay_mask(params: Any) -> Any:
  """True for conv/dense kernels (weight decay and trust ratio), False for BN params and biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def param_labels(params: Any) -> Any:
  """'probe' for the online probe's parameters, 'lars' for everything else."""
  return {k: jax.tree.map(lambda _, k=k: PROBE if k == PROBE else 'lars', v)
          for k, v in params.items()}


def make_optimizer(optim_cfg: ml_collections.ConfigDict, batch_size: int, steps_per_epoch: int,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """LARS (+ momentum SGD for the probe) from `config.optim`; returns (tx, encoder lr schedule)."""
  warmup = int(round(optim_cfg.warmup_epochs * steps_per_epoch))
  peak = scaled_learning_rate(optim_cfg.base_lr, batch_size, optim_cfg.lr_scaling)
  lr = warmup_cosine(peak, warmup, total_steps)
  lars = optax.lars(lr, weight_decay=optim_cfg.weight_decay, weight_decay_mask=decay_mask,
                    trust_coefficient=optim_cfg.trust_coefficient, eps=0.0,
                    trust_ratio_mask=decay_mask, momentum=optim_cfg.momentum)
  probe = optax.sgd(warmup_cosine(optim_cfg.probe_lr, warmup, total_steps),
                    momentum=optim_cfg.momentum)
  return optax.multi_transform({'lars': lars, PROBE: probe}, param_labels), lr
