"""NT-Xent against an independent numpy reference, on one device and sharded over 8."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import losses, parallel


def nt_xent_numpy(z1: np.ndarray, z2: np.ndarray, t: float) -> tuple[float, float, float]:
  """The paper's definition, written out on the full [2N, 2N] matrix in float64."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n = len(z1)
  sim = z @ z.T / t
  loss, correct, entropy = 0.0, 0, 0.0
  for i in range(2 * n):
    pos = (i + n) % (2 * n)
    others = [j for j in range(2 * n) if j != i]
    row = sim[i, others]
    log_denominator = np.log(np.sum(np.exp(row - row.max()))) + row.max()
    loss += -(sim[i, pos] - log_denominator)
    correct += others[int(np.argmax(row))] == pos
    p = np.exp(row - log_denominator)
    entropy += -np.sum(p * np.log(p))
  return loss / (2 * n), correct / (2 * n), entropy / (2 * n)


def nt_xent_jnp_reference(z1, z2, t):
  """Independent full-matrix jnp version used only for its gradient."""
  z = jnp.concatenate([z1, z2])
  z = z / jnp.linalg.norm(z, axis=1, keepdims=True)
  n2 = z.shape[0]
  sim = z @ z.T / t
  sim = jnp.where(jnp.eye(n2, dtype=bool), -jnp.inf, sim)
  pos = (jnp.arange(n2) + n2 // 2) % n2
  return -jnp.mean(jax.nn.log_softmax(sim, axis=1)[jnp.arange(n2), pos])


@pytest.mark.parametrize('n,d,t', [(4, 3, 0.5), (16, 8, 0.1), (33, 128, 1.0), (8, 16, 0.07)])
def test_matches_numpy(n, d, t):
  rng = np.random.default_rng(n * d)
  z1, z2 = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
  z2[: n // 2] = z1[: n // 2] + 0.1 * z2[: n // 2]  # make some positives easy so acc is not 0
  loss, metrics = losses.nt_xent(z1, z2, t)
  ref_loss, ref_acc, ref_entropy = nt_xent_numpy(z1, z2, t)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['contrastive_acc'], ref_acc, rtol=1e-6)
  np.testing.assert_allclose(metrics['contrastive_entropy'], ref_entropy, rtol=1e-5)


@pytest.mark.parametrize('n,d,t', [(4, 3, 0.5), (16, 8, 0.1), (24, 32, 0.2)])
def test_gradient_matches_reference(n, d, t):
  rng = np.random.default_rng(n + d)
  z1, z2 = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
  g = jax.grad(lambda a, b: losses.nt_xent(a, b, t)[0], argnums=(0, 1))(z1, z2)
  g_ref = jax.grad(nt_xent_jnp_reference, argnums=(0, 1))(z1, z2, t)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _sharded_inputs(mesh, n=64, d=16):
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
  put = lambda x: jax.device_put(x, parallel.batch_sharded(mesh))
  return z1, z2, put(z1), put(z2)


def test_sharded_equals_single_device(devices):
  mesh = parallel.make_mesh(devices)
  z1, z2, s1, s2 = _sharded_inputs(mesh)
  f = lambda a, b, m: losses.nt_xent(a, b, 0.2, m)
  loss8, met8 = jax.jit(lambda a, b: f(a, b, mesh))(s1, s2)
  loss1, met1 = f(z1, z2, None)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  for k in met1:
    np.testing.assert_allclose(met8[k], met1[k], rtol=1e-6)
  g8 = jax.jit(jax.grad(lambda a, b: f(a, b, mesh)[0], argnums=(0, 1)))(s1, s2)
  g1 = jax.grad(lambda a, b: f(a, b, None)[0], argnums=(0, 1))(z1, z2)
  for a, b in zip(g8, g1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_per_device_logits_are_local_rows_by_global(devices):
  """Each device holds [2n_local, 2N] logits; no [2N, 2N] buffer appears in the compiled HLO."""
  mesh = parallel.make_mesh(devices)
  n, d = 64, 16
  _, _, s1, s2 = _sharded_inputs(mesh, n, d)
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
  lsm = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(loss, -(lsm[0, 0] + lsm[1, 0]) / 2, rtol=1e-6)
  np.testing.assert_allclose(acc, 0.5)
