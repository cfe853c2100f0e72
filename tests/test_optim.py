"""LARS, its masks, step counts and schedule against numpy transcriptions of official SimCLR.

References: tf2/lars_optimizer.py (classic momentum), tf2/model.py build_optimizer /
add_weight_decay / get_train_steps / WarmUpAndCosineDecay (with tf.keras CosineDecay, alpha 0).
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import base
from simclr_jax import optim
from simclr_jax.errors import ConfigError
from simclr_jax.models import simclr


def official_lr(step, base_lr, batch, num_examples, warmup_epochs, total, scaling='linear'):
  """WarmUpAndCosineDecay.__call__ transcribed to Python floats."""
  warmup = int(round(warmup_epochs * num_examples // batch))
  scaled_lr = base_lr * batch / 256. if scaling == 'linear' else base_lr * math.sqrt(batch)
  learning_rate = step / float(warmup) * scaled_lr if warmup else scaled_lr
  decay_steps = total - warmup
  cosine = scaled_lr * 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay_steps)
                                           / decay_steps))
  return learning_rate if step < warmup else cosine


def official_lars_step(param, grad, v, lr, *, momentum, weight_decay, eeta, name):
  """LARSOptimizer._resource_apply_dense (classic momentum, no Nesterov) for one variable.

  `name` is the official variable name: weight decay and layer adaptation are skipped when it
  contains 'batch_normalization', 'bias' or 'head_supervised' (build_optimizer); add_weight_decay
  puts weight_decay * l2_loss of the head_supervised kernel into the loss instead.
  """
  if 'head_supervised' in name and 'bias' not in name:
    grad = grad + weight_decay * param  # d/dw of weight_decay * sum(w^2) / 2
  excluded = any(s in name for s in ('batch_normalization', 'bias', 'head_supervised'))
  if not excluded:
    grad = grad + weight_decay * param
  trust_ratio = 1.0
  if not excluded:
    w_norm, g_norm = np.linalg.norm(param), np.linalg.norm(grad)
    trust_ratio = eeta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
  next_v = momentum * v + lr * trust_ratio * grad
  return param - next_v, next_v


def _official_name(path: str) -> str:
  """Our parameter path → the official variable name's telling part (what its rules match)."""
  names = path.split('/')
  if names[0] == simclr.PROBE:  # the online probe is official SupervisedHead 'head_supervised'
    return f'head_supervised/{names[-1]}'
  if names[-1] == 'scale':  # flax BatchNorm scale = Keras BN gamma
    return 'batch_normalization/gamma'
  return names[-1]  # 'kernel', or 'bias' (a BN beta or a dense bias: excluded either way)


def test_learning_rate_scaling():
  # Python floats: a rounding or two (1e-16), far inside approx's 1e-6.
  assert optim.scaled_learning_rate(0.3, 4096, 'linear') == pytest.approx(4.8)
  assert optim.scaled_learning_rate(0.075, 4096, 'sqrt') == pytest.approx(4.8)
  with pytest.raises(ConfigError, match='config.optim.lr_scaling'):
    optim.scaled_learning_rate(1.0, 256, 'cubic')


def test_official_step_counts():
  train = ml_collections.ConfigDict({'batch_size': 512, 'epochs': 1000.0, 'steps': -1})
  assert optim.train_steps(50_000, train) == 97_657  # 50000 * 1000 / 512 = 97656.25 → 97656 + 1
  train.epochs = 2.5
  assert optim.train_steps(1000, train) == 5  # 2500 / 512 = 4.88 → 4 + 1
  train.steps = 7
  assert optim.train_steps(50_000, train) == 7
  # 10 * 50000 / 512 = 976.56: floored to 976 before the round (not 977).
  assert optim.warmup_steps(10.0, 50_000, 512) == 976
  assert optim.warmup_steps(0.0, 50_000, 512) == 0


# The float32 schedule against the float64 reference (u = 2^-24): the cosine's argument
# a = pi·c/T carries <= 3u·a (pi, c/T, the product; steps < 2^24 are exact), which moves lr by
# <= peak/2·sin(a)·3u·a; cos adds <= 1 ulp, 1 + cos and the peak 2 roundings: <= 6.7u·peak.
def test_cifar_schedule_matches_official():
  """CIFAR recipe: 50,000 examples, batch 512, 1000 epochs, 10 warm-up epochs, lr 1.0 linear."""
  cfg = base.get_config()
  cfg.optim.update(base_lr=1.0, lr_scaling='linear', warmup_epochs=10.0)
  total = optim.train_steps(50_000, cfg.train)
  _, lr = optim.make_optimizer(cfg.optim, 512, 50_000, total)
  for step in [0, 1, 488, 975, 976, 977, 20_000, 50_000, 97_000, 97_656, 97_657, 100_000]:
    expected = official_lr(step, 1.0, 512, 50_000, 10.0, 97_657)
    # <= 8e-7 at peak 2 (above). A step off by one moves lr by 3e-5 mid-cosine, 1e-3 in warm-up.
    assert float(lr(step)) == pytest.approx(expected, rel=1e-5, abs=1e-6), step
  # 0 and the peak: exact in float32 (0 · peak; cos(0) = 1), approx's 1e-6 to spare.
  assert float(lr(0)) == 0.0 and float(lr(976)) == pytest.approx(2.0)


# Warm-up steps int(round(e * 100 // 64)): 0, 4 of 10, and 15 > the 10 steps of the run.
@pytest.mark.parametrize('warmup_epochs,total', [(0.0, 50), (3.0, 10), (10.0, 10)])
def test_schedule_without_warmup_and_shorter_than_warmup(warmup_epochs, total):
  """No warm-up starts at the peak; a run shorter than its warm-up stays on the warm-up line."""
  cfg = base.get_config().optim
  cfg.update(base_lr=0.075, lr_scaling='sqrt', warmup_epochs=warmup_epochs)
  _, lr = optim.make_optimizer(cfg, 64, 100, total)
  for step in range(total + 1):
    expected = official_lr(step, 0.075, 64, 100, warmup_epochs, total, 'sqrt')
    # <= 2.4e-7 at peak 0.6 (above); a step off by one moves lr by ~2e-2 mid-run here.
    assert float(lr(step)) == pytest.approx(expected, rel=1e-5, abs=3e-7), step


@pytest.fixture(scope='module')
def real_params():
  cfg = base.get_config().model
  cfg.width = 1 / 16
  model = simclr.from_config(cfg, num_classes=10)
  # Shapes only (no compile): the tests draw their own values.
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 8, 8, 3)))['params']


def test_lars_matches_official_on_the_actual_parameter_tree(real_params):
  """Four steps (warm-up, peak, cosine) per leaf against official LARS with its name rules."""
  cfg = base.get_config().optim
  cfg.update(warmup_epochs=0.2, weight_decay=1e-2, base_lr=1.0, lr_scaling='linear')
  num_examples, batch, total = 1000, 128, 10  # warm-up int(round(0.2 * 1000 // 128)) = 1 step
  tx, _ = optim.make_optimizer(cfg, batch, num_examples, total)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(real_params)
  paths = ['/'.join(k.key for k in path) for path, _ in leaves]
  rng = np.random.default_rng(0)
  draw = lambda: treedef.unflatten([rng.normal(size=v.shape).astype(np.float32)
                                    for _, v in leaves])
  # Non-zero params everywhere so decay and trust ratio would show if wrongly applied.
  params = draw()
  ref = {k: (np.asarray(p, np.float64), 0.0) for k, p in zip(paths, jax.tree.leaves(params))}
  state, update = tx.init(params), jax.jit(tx.update)
  for step in range(4):
    lr = official_lr(step, 1.0, batch, num_examples, 0.2, total)
    grads = draw()
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for k, g in zip(paths, jax.tree.leaves(grads)):
      ref[k] = official_lars_step(*ref[k][:1], np.asarray(g, np.float64), ref[k][1], lr,
                                  momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                  eeta=cfg.trust_coefficient, name=_official_name(k))
  # float32 steps vs the float64 reference. Untrusted leaves (BN, biases, probe): ~12 roundings
  # of values <= 9.3 (ulp/2 <= 4.8e-7), <= 5.8e-6. Kernels: updates ~5e-4·|g| whose trust ratio's
  # float32 norms (<= 9216 terms, <= 1.1e-3 relative) add <= 1.4e-5 over the steps. A wrong rule,
  # trust ratio or momentum moves a leaf by >= 4e-4.
  for k, p in zip(paths, jax.tree.leaves(params)):
    np.testing.assert_allclose(p, ref[k][0], rtol=2e-5, atol=2e-5, err_msg=k)
  # Every rule was exercised: trusted kernels, BN gamma, biases, the probe's kernel and bias.
  assert {_official_name(k) for k in paths} == {
      'kernel', 'bias', 'batch_normalization/gamma', 'head_supervised/kernel',
      'head_supervised/bias'}


def test_decay_mask_selects_only_kernels(real_params):
  mask = optim.decay_mask(real_params)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  for path, selected in flat:
    assert selected == (path[-1].key == 'kernel'), path
  assert sum(s for _, s in flat) > 0
