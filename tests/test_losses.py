"""NT-Xent against an independent numpy transcription of the official objective and metrics.

The reference follows official SimCLR's tf2/objective.py add_contrastive_loss (logits_aa,
logits_bb, logits_ab, logits_ba; self-similarity minus LARGE_NUM; loss = mean(loss_a + loss_b))
and tf2/metrics.py update_pretrain_metrics_train (accuracy and entropy of logits_ab), written
out on the whole batch in float64. Checked on one device and sharded over 8.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
from simclr_jax import losses, parallel

LARGE_NUM = 1e9
U = numerics.EPS32 / 2  # float32's unit roundoff


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def official_numpy(z1: np.ndarray, z2: np.ndarray, t: float) -> tuple[float, float, float]:
  """(loss, contrastive_acc, contrastive_entropy) as official SimCLR computes them, float64."""
  z1, z2 = z1.astype(np.float64), z2.astype(np.float64)
  h1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  h2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  n = len(z1)
  labels = np.eye(n, 2 * n)  # tf.one_hot(tf.range(batch_size), batch_size * 2)
  masks = np.eye(n)
  logits_aa = h1 @ h1.T / t - masks * LARGE_NUM
  logits_bb = h2 @ h2.T / t - masks * LARGE_NUM
  logits_ab = h1 @ h2.T / t
  logits_ba = h2 @ h1.T / t
  loss_a = -np.sum(labels * _log_softmax(np.concatenate([logits_ab, logits_aa], 1)), 1)
  loss_b = -np.sum(labels * _log_softmax(np.concatenate([logits_ba, logits_bb], 1)), 1)
  loss = np.mean(loss_a + loss_b)
  acc = np.mean(np.argmax(labels, 1) == np.argmax(logits_ab, 1))
  p = np.exp(_log_softmax(logits_ab))
  entropy = -np.mean(np.sum(p * np.log(p + 1e-8), -1))
  return loss, acc, entropy


def official_jnp(z1, z2, t):
  """The same official loss in jnp, full matrices, used only for its gradient."""
  h1 = z1 / jnp.linalg.norm(z1, axis=1, keepdims=True)
  h2 = z2 / jnp.linalg.norm(z2, axis=1, keepdims=True)
  n = z1.shape[0]
  labels, masks = jnp.eye(n, 2 * n), jnp.eye(n)
  ce = lambda logits: -jnp.sum(labels * jax.nn.log_softmax(logits, axis=1), axis=1)
  loss_a = ce(jnp.concatenate([h1 @ h2.T / t, h1 @ h1.T / t - masks * LARGE_NUM], 1))
  loss_b = ce(jnp.concatenate([h2 @ h1.T / t, h2 @ h2.T / t - masks * LARGE_NUM], 1))
  return jnp.mean(loss_a + loss_b)


def _inputs(n, d, seed):
  rng = np.random.default_rng(seed)
  z1, z2 = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
  z2[: n // 2] = z1[: n // 2] + 0.3 * z2[: n // 2]  # some easy positives so acc is not 0 or 1
  return z1, z2


def _logit_err(d: int, t: float) -> float:
  """Bound on a float32 logit's error: each row normalised (d squares, an rsqrt: <= (d/2 + 2)u
  relative), the d-term dot (<= d·u of |h1||h2| = 1), the division by t: (2d + 5)u/t."""
  return (2 * d + 5) * U / t


def _tolerances(n: int, d: int, t: float) -> tuple[float, float, float]:
  """(loss atol, loss rtol, entropy rtol) of float32 NT-Xent from the exact values, n pairs."""
  delta = _logit_err(d, t)
  # Each anchor's cross-entropy moves <= 2 delta (its gradient in the logits has L1 norm <= 2),
  # plus its log-sum-exp's sum of 2n exps and shifts by the max (2u/t); two anchors per example.
  # The mean adds 2n positive terms: sum_rtol(2n) relative.
  loss_atol = 2 * (2 * delta + numerics.sum_rtol(2 * n) + 2 * U / t)
  # The entropy's gradient in the logits, p(log p + H), has L1 norm <= 2H: <= 2 delta relative;
  # then the softmax's sums of n terms and the final sum of n^2 terms of one sign.
  entropy_rtol = 2 * delta + numerics.sum_rtol(n) + numerics.sum_rtol(n * n)
  return loss_atol, numerics.sum_rtol(2 * n), entropy_rtol


def _check_against_official(loss, metrics, z1, z2, t):
  ref_loss, ref_acc, ref_entropy = official_numpy(z1, z2, t)
  loss_atol, loss_rtol, entropy_rtol = _tolerances(*z1.shape, t)
  # float64 reference, float32's bounds above (here loss <= 1.3e-4 abs + 1.5e-5 rel, entropy
  # <= 5.2e-4 rel); a wrong mask, temperature, direction or scale moves these by >= 1e-2.
  np.testing.assert_allclose(loss, ref_loss, rtol=loss_rtol, atol=loss_atol)
  # Top-1 gaps of logits_ab are >= 1.5e-3 in these inputs, >= 24x two logits' errors (2 delta):
  # the same argmax, so acc = k/n exactly but for float32's rounding of k/n (6e-8).
  np.testing.assert_allclose(metrics['contrastive_acc'], ref_acc, rtol=1e-6)
  np.testing.assert_allclose(metrics['contrastive_entropy'], ref_entropy, rtol=entropy_rtol)
  assert 0 < ref_acc < 1  # the accuracy check is not vacuous


@pytest.mark.parametrize('n,d,t', [(4, 3, 0.5), (16, 8, 0.1), (33, 128, 1.0), (8, 16, 0.07)])
def test_matches_official_numpy(n, d, t):
  z1, z2 = _inputs(n, d, n * d)
  loss, metrics = losses.nt_xent(z1, z2, t)
  _check_against_official(loss, metrics, z1, z2, t)


def _grad_atol(want: np.ndarray, n: int, d: int, t: float) -> float:
  """Two float32 gradients of NT-Xent, entry by entry. Each is a sum of keys/t weighted by
  softmax - onehot, whose weights are within 2 delta (the logits) + sum_rtol(2n) (the softmax's
  sum) relative on each side: twice that of the gradient's scale, which max|want| measures.
  Dropping the keys' gradient (stop_gradient on the gathered side) changes entries by ~50%."""
  return 2 * (2 * _logit_err(d, t) + numerics.sum_rtol(2 * n)) * np.abs(want).max()


@pytest.mark.parametrize('n,d,t', [(4, 3, 0.5), (16, 8, 0.1), (24, 32, 0.2)])
def test_gradient_matches_official(n, d, t):
  z1, z2 = _inputs(n, d, n + d)
  g = jax.grad(lambda a, b: losses.nt_xent(a, b, t)[0], argnums=(0, 1))(z1, z2)
  g_ref = jax.grad(official_jnp, argnums=(0, 1))(z1, z2, t)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=0, atol=_grad_atol(b, z1.shape[0], d, t))


def _put(mesh, *arrays):
  return [jax.device_put(x, parallel.batch_sharded(mesh)) for x in arrays]


def test_sharded_matches_official_and_single_device(devices):
  """8 devices: loss, metrics (over the global batch) and gradients as official and 1 device."""
  mesh = parallel.make_mesh(devices)
  z1, z2 = _inputs(64, 16, 0)
  t = 0.2
  s1, s2 = _put(mesh, z1, z2)
  loss8, met8 = jax.jit(lambda a, b: losses.nt_xent(a, b, t, mesh))(s1, s2)
  _check_against_official(loss8, met8, z1, z2, t)
  loss1, met1 = losses.nt_xent(z1, z2, t)
  # Two float32 programs (8 local sums and a psum vs one sum; other matmul shapes): each within
  # _tolerances of the exact value, so within twice that of each other. A positive or self
  # column off by a shard's offset, or a missing psum, moves them by >= 1e-2.
  loss_atol, loss_rtol, entropy_rtol = _tolerances(64, 16, t)
  np.testing.assert_allclose(loss8, loss1, rtol=2 * loss_rtol, atol=2 * loss_atol)
  # Counts of the same argmaxes (top-1 gaps >= 2.3e-3 >> 2 delta = 2.2e-5): equal.
  np.testing.assert_array_equal(met8['contrastive_acc'], met1['contrastive_acc'])
  np.testing.assert_allclose(met8['contrastive_entropy'], met1['contrastive_entropy'],
                             rtol=2 * entropy_rtol)
  g8 = jax.jit(jax.grad(lambda a, b: losses.nt_xent(a, b, t, mesh)[0], argnums=(0, 1)))(s1, s2)
  g_ref = jax.grad(official_jnp, argnums=(0, 1))(z1, z2, t)
  for a, b in zip(g8, g_ref):
    np.testing.assert_allclose(a, b, rtol=0, atol=_grad_atol(b, 64, 16, t))


def test_per_device_logits_are_local_rows_by_global(devices):
  """Each device holds [2n_local, 2N] logits; no [2N, 2N] buffer appears in the compiled HLO."""
  mesh = parallel.make_mesh(devices)
  n, d = 64, 16
  s1, s2 = _put(mesh, *_inputs(n, d, 0))
  grad_fn = jax.jit(jax.value_and_grad(lambda a, b: losses.nt_xent(a, b, 0.2, mesh)[0],
                                       argnums=(0, 1)))
  hlo = grad_fn.lower(s1, s2).compile().as_text()
  n_local = n // len(devices)
  assert f'f32[{2 * n_local},{2 * n}]' in hlo
  assert f'[{2 * n},{2 * n}]' not in hlo


def test_probe_loss_ignores_unlabelled():
  logits = np.array([[2.0, 0.0], [0.0, 3.0], [5.0, 0.0]], np.float32)
  labels = np.array([0, 0, -1])
  loss, acc = losses.probe_loss(logits, labels)
  x = logits.astype(np.float64)
  lsm = x - np.log(np.exp(x).sum(1, keepdims=True))
  # float64 reference; float32 makes <= ~8 roundings of terms <= 3.2 (<= 4e-7 abs, 2.5e-7 of the
  # loss 1.59). Counting the unlabelled row, or a wrong label, moves it by >= 30%.
  np.testing.assert_allclose(loss, -(lsm[0, 0] + lsm[1, 0]) / 2, rtol=1e-6)
  np.testing.assert_allclose(acc, 0.5)  # 1 of 2 labelled rows: exact in float32.
