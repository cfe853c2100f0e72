"""LARS masks on the real SimCLR parameter tree, schedules and learning-rate scaling."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from simclr_jax import optim
from simclr_jax.models import simclr


def test_learning_rate_scaling():
  assert optim.scaled_learning_rate(0.3, 4096, 'linear') == pytest.approx(4.8)
  assert optim.scaled_learning_rate(0.075, 4096, 'sqrt') == pytest.approx(4.8)
  with pytest.raises(ValueError, match='config.optim.lr_scaling'):
    optim.scaled_learning_rate(1.0, 256, 'cubic')


def test_warmup_then_cosine_to_zero():
  peak, warmup, total = 2.0, 10, 110
  lr = optim.warmup_cosine(peak, warmup, total)
  for step in [0, 3, 10, 35, 60, 109, 110]:
    if step < warmup:
      expected = peak * step / warmup
    else:
      expected = 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    assert float(lr(step)) == pytest.approx(expected, abs=1e-6), step


def _real_params():
  cfg = base.get_config().model
  cfg.width = 1 / 16
  model = simclr.from_config(cfg, num_classes=10)
  return jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))['params']


def test_lars_masks_on_the_actual_parameter_tree():
  """First LARS step per leaf against a numpy reference of official SimCLR's LARS."""
  cfg = base.get_config().optim
  cfg.update(warmup_epochs=0.0, weight_decay=1e-2, base_lr=1.0, probe_lr=0.3)
  params = _real_params()
  tx, lr_fn = optim.make_optimizer(cfg, batch_size=256, steps_per_epoch=10, total_steps=100)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(0)
  # Non-zero params everywhere so decay and trust ratio would show if wrongly applied.
  params = treedef.unflatten([rng.normal(size=v.shape).astype(np.float32) for _, v in leaves])
  grads = treedef.unflatten([rng.normal(size=v.shape).astype(np.float32) for _, v in leaves])
  updates, _ = tx.update(grads, tx.init(params), params)
  lr = float(lr_fn(0))
  assert lr == pytest.approx(1.0)
  kinds = set()
  for (path, p), (_, g), (_, u) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                       jax.tree_util.tree_flatten_with_path(grads)[0],
                                       jax.tree_util.tree_flatten_with_path(updates)[0]):
    names = [k.key for k in path]
    if names[0] == 'probe':
      expected, kind = -0.3 * g, 'probe'
    elif names[-1] == 'kernel':
      g_wd = g + cfg.weight_decay * p
      ratio = cfg.trust_coefficient * np.linalg.norm(p) / np.linalg.norm(g_wd)
      expected, kind = -lr * ratio * g_wd, 'kernel'
    else:
      expected, kind = -lr * g, names[-1]  # BN scale/bias, no decay, no trust ratio
    kinds.add(kind)
    np.testing.assert_allclose(u, expected, rtol=2e-5, atol=1e-8, err_msg='/'.join(names))
  assert kinds == {'probe', 'kernel', 'scale', 'bias'}


def test_decay_mask_selects_only_kernels():
  mask = optim.decay_mask(_real_params())
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  for path, selected in flat:
    assert selected == (path[-1].key == 'kernel'), path
  assert sum(s for _, s in flat) > 0
