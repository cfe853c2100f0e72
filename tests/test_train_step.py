"""The sharded train step: 8 devices equal 1 device, global BN, local-rows logits, learning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from simclr_jax import optim, parallel
from simclr_jax import train_step as ts
from simclr_jax.models import simclr

GLOBAL_BATCH = 32
IMAGE = (8, 8, 3)


def _setup(mesh, seed=0):
  cfg = base.get_config()
  cfg.model.width = 1 / 16
  cfg.optim.warmup_epochs = 0.0
  model = simclr.from_config(cfg.model, num_classes=10)
  tx, lr = optim.make_optimizer(cfg.optim, GLOBAL_BATCH, 320, 100)
  state = ts.init_state(model, tx, jax.random.key(seed), IMAGE, mesh)
  step = ts.make_train_step(model, tx, lr, cfg.loss.temperature, mesh)
  return model, state, step


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  img = rng.random((GLOBAL_BATCH, *IMAGE), np.float32)
  # Two correlated views so the contrastive task is learnable.
  return {'view1': img, 'view2': np.clip(img + 0.05 * rng.normal(size=img.shape), 0, 1).astype(
      np.float32), 'label': rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)}


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


def _assert_trees_close(a, b, tol=1e-4):
  # 1e-4: some BN-scale gradients differ from a float64 reference by 1-2e-5 already on one
  # device (float32 rounding of sums over the batch), so 8 devices' other order can reach 4e-5.
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb):
    assert _rel_err(x, y) <= tol, (jax.tree_util.keystr(path), _rel_err(x, y))


@pytest.fixture(scope='module')
def one_and_eight(devices):
  mesh1, mesh8 = parallel.make_mesh(devices[:1]), parallel.make_mesh(devices)
  return (mesh1, *_setup(mesh1)), (mesh8, *_setup(mesh8))


def test_eight_devices_equal_one_device(one_and_eight):
  (mesh1, model, state1, step1), (mesh8, _, state8, step8) = one_and_eight
  batch = _batch()
  _assert_trees_close(state8.params, state1.params, tol=0)  # same init on both meshes

  def grads_on(mesh, state):
    fn = jax.jit(lambda p, bs, b: ts.compute_grads(p, bs, b, model=model, temperature=0.5,
                                                   mesh=mesh))
    return fn(state.params, state.batch_stats, parallel.host_batch_to_global(batch, mesh))

  g1, m1, bs1 = grads_on(mesh1, state1)
  g8, m8, bs8 = grads_on(mesh8, state8)
  _assert_trees_close(g8, g1)
  _assert_trees_close(bs8, bs1)  # BN statistics over the global batch, not per device
  for k in m1:
    assert _rel_err(m8[k], m1[k]) < 1e-5, k

  new1, met1 = step1(state1, parallel.host_batch_to_global(batch, mesh1), None)
  new8, met8 = step8(state8, parallel.host_batch_to_global(batch, mesh8), None)
  _assert_trees_close(new8.params, new1.params)
  _assert_trees_close(new8.batch_stats, new1.batch_stats)
  _assert_trees_close(new8.opt_state, new1.opt_state)
  for k in met1:
    assert _rel_err(met8[k], met1[k]) < 1e-5, k


def test_batch_norm_statistics_are_global(devices):
  """Running mean of the stem BN after one step = 0.1 × mean over all 2N views (numpy)."""
  mesh = parallel.make_mesh(devices)
  model, state, _ = _setup(mesh)
  batch = _batch(1)
  _, _, bs = jax.jit(lambda p, b_s, b: ts.compute_grads(p, b_s, b, model=model, temperature=0.5,
                                                        mesh=mesh))(
      state.params, state.batch_stats, parallel.host_batch_to_global(batch, mesh))
  x = np.concatenate([batch['view1'], batch['view2']])
  kernel = np.asarray(state.params['encoder']['stem_conv']['kernel'])
  conv = np.asarray(jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=(
      'NHWC', 'HWIO', 'NHWC')), np.float64)
  np.testing.assert_allclose(bs['encoder']['stem_bn']['mean'], 0.1 * conv.mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-7)


def test_compiled_step_holds_only_local_rows_of_logits(one_and_eight):
  (_, _, _, _), (mesh8, _, state8, step8) = one_and_eight
  batch = parallel.host_batch_to_global(_batch(), mesh8)
  hlo = step8.lower(state8, batch, None).compile().as_text()
  n_local = GLOBAL_BATCH // mesh8.size
  assert f'f32[{2 * n_local},{2 * GLOBAL_BATCH}]' in hlo
  assert f'[{2 * GLOBAL_BATCH},{2 * GLOBAL_BATCH}]' not in hlo


def test_steps_lower_the_loss_and_runs_are_deterministic(devices):
  mesh = parallel.make_mesh(devices)
  batch = parallel.host_batch_to_global(_batch(2), mesh)
  runs = []
  for _ in range(2):
    _, state, step = _setup(mesh, seed=3)
    losses = []
    for _ in range(6):
      state, metrics = step(state, batch, None)
      losses.append(float(metrics['loss']))
    runs.append((losses, jax.device_get(state.params)))
  (losses, params), (losses_again, params_again) = runs
  assert losses[-1] < losses[0] - 0.05, losses
  assert losses == losses_again
  _assert_trees_close(params_again, params, tol=0)
  assert set(metrics) >= {'loss', 'contrastive_acc', 'contrastive_entropy', 'probe_loss',
                          'probe_acc', 'learning_rate', 'grad_norm'}
