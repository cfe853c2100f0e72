"""NT-Xent over the global batch (DESIGN.md "NT-Xent") and the online probe's loss.

Each device computes only its own anchor rows against the gathered keys of all devices:
logits are [2 n_local, 2 N_global], never [2N, 2N]. The all-gather's transpose is a
reduce-scatter, so gradients flow into every device's embeddings and the sharded gradient equals
the single-device one.
"""
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from simclr_jax.parallel import DATA_AXIS

# Official SimCLR masks self-similarity with -1e9 rather than -inf: exp() underflows to exactly 0
# and entropy's p*log(p) stays finite.
_MASK_VALUE = -1e9


def _l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _nt_xent_local(z1: jnp.ndarray, z2: jnp.ndarray, temperature: float,
                   axis_name: str | None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """NT-Xent for this device's rows; `axis_name` None means the arrays are the whole batch."""
  z1 = _l2_normalize(z1.astype(jnp.float32))
  z2 = _l2_normalize(z2.astype(jnp.float32))
  n_local = z1.shape[0]
  if axis_name is None:
    z1_all, z2_all, offset = z1, z2, 0
  else:
    z1_all = jax.lax.all_gather(z1, axis_name, tiled=True)
    z2_all = jax.lax.all_gather(z2, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * n_local
  n_global = z1_all.shape[0]

  anchors = jnp.concatenate([z1, z2], axis=0)  # [2n_local, d]
  keys = jnp.concatenate([z1_all, z2_all], axis=0)  # [2N, d]
  logits = anchors @ keys.T / temperature  # [2n_local, 2N]

  rows = offset + jnp.arange(n_local)
  self_col = jnp.concatenate([rows, rows + n_global])
  positive_col = jnp.concatenate([rows + n_global, rows])
  cols = jnp.arange(2 * n_global)
  logits = jnp.where(cols[None, :] == self_col[:, None], _MASK_VALUE, logits)

  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, positive_col[:, None], axis=-1)[:, 0]
  sums = {
      'loss': jnp.sum(nll),
      'contrastive_acc': jnp.sum(jnp.argmax(logits, axis=-1) == positive_col).astype(jnp.float32),
      'contrastive_entropy': jnp.sum(-jnp.exp(log_probs) * log_probs),
  }
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  means = {k: v / (2 * n_global) for k, v in sums.items()}
  return means.pop('loss'), means


def nt_xent(z1: jnp.ndarray, z2: jnp.ndarray, temperature: float,
            mesh: Mesh | None = None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """NT-Xent loss (mean over the 2N anchors) of two views' projections z1, z2: [N, d].

  With `mesh` (more than one device) z1 and z2 are global arrays sharded on "data" and each
  device computes its own rows against the gathered batch. Returns (loss, metrics) with metrics
  `contrastive_acc` (top-1 of the positive among 2N-1 candidates) and `contrastive_entropy`.
  """
  if mesh is None or mesh.size == 1:
    return _nt_xent_local(z1, z2, temperature, axis_name=None)
  fn = jax.shard_map(partial(_nt_xent_local, temperature=temperature, axis_name=DATA_AXIS),
                     mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS)), out_specs=(P(), P()))
  return fn(z1, z2)


def probe_loss(logits: jnp.ndarray, labels: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Softmax cross-entropy and accuracy of the probe, ignoring examples labelled -1."""
  valid = (labels >= 0).astype(jnp.float32)
  safe = jnp.maximum(labels, 0)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe[:, None], axis=-1)[:, 0]
  count = jnp.maximum(jnp.sum(valid), 1.0)
  loss = jnp.sum(nll * valid) / count
  acc = jnp.sum((jnp.argmax(logits, -1) == safe) * valid) / count
  return loss, acc
