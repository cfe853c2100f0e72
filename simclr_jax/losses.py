"""NT-Xent over the global batch (official add_contrastive_loss), the probe loss, distillation.

Each device computes only its own anchor rows against the gathered keys of all devices:
logits are [2 n_local, 2 N_global], never [2N, 2N]. The all-gather's transpose is a
reduce-scatter, so gradients flow into every device's embeddings and the sharded gradient equals
the single-device one.

The value is the official one, `tf.reduce_mean(loss_a + loss_b)`: per direction (view-1 anchors,
view-2 anchors) the mean cross-entropy over the N anchors, summed over the two directions, i.e.
twice the mean over all 2N anchors. The official hyperparameters (LARS learning rate against the
untrusted BN parameters, weight decay against the gradient) were tuned on this scale.
"""
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from simclr_jax.parallel import DATA_AXIS

# Official LARGE_NUM: subtracted from the self-similarity logits. exp() of it underflows to
# exactly 0 in float32, and p*log(p) stays finite where -inf would give NaN.
LARGE_NUM = 1e9
# Official update_pretrain_metrics_train: entropy = -sum(p * log(p + 1e-8)).
_ENTROPY_EPS = 1e-8


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
  """Rows to unit L2 norm as tf.math.l2_normalize: x / sqrt(max(sum(x^2), 1e-12))."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def _nt_xent_local(z1: jnp.ndarray, z2: jnp.ndarray, temperature: float,
                   axis_name: str | None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """NT-Xent for this device's rows; `axis_name` None means the arrays are the whole batch."""
  # At least float32 (bfloat16 projections are promoted; float64 references stay float64).
  z1 = l2_normalize(z1.astype(jnp.promote_types(z1.dtype, jnp.float32)))
  z2 = l2_normalize(z2.astype(jnp.promote_types(z2.dtype, jnp.float32)))
  n_local = z1.shape[0]
  if axis_name is None:
    z1_all, z2_all, offset = z1, z2, 0
  else:
    z1_all = jax.lax.all_gather(z1, axis_name, tiled=True)
    z2_all = jax.lax.all_gather(z2, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * n_local
  n_global = z1_all.shape[0]

  # Rows: this device's view-1 then view-2 anchors; columns: all view-1 then all view-2 keys.
  # Row i of view 1 holds the official [logits_aa | logits_ab] and row i of view 2
  # [logits_ba | logits_bb] (column order does not change a softmax cross-entropy).
  anchors = jnp.concatenate([z1, z2], axis=0)  # [2n_local, d]
  keys = jnp.concatenate([z1_all, z2_all], axis=0)  # [2N, d]
  logits = anchors @ keys.T / temperature  # [2n_local, 2N]

  rows = offset + jnp.arange(n_local)  # global index of this device's examples
  self_col = jnp.concatenate([rows, rows + n_global])
  positive_col = jnp.concatenate([rows + n_global, rows])
  cols = jnp.arange(2 * n_global)
  logits = logits - LARGE_NUM * (cols[None, :] == self_col[:, None])
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, positive_col[:, None], axis=-1)[:, 0]

  # Official metrics read logits_ab only: view-1 anchors against the N view-2 keys.
  logits_ab = logits[:n_local, n_global:]
  probs_ab = jax.nn.softmax(logits_ab, axis=-1)
  sums = {
      'loss': jnp.sum(nll),
      'contrastive_acc': jnp.sum(jnp.argmax(logits_ab, axis=-1) == rows).astype(jnp.float32),
      'contrastive_entropy': -jnp.sum(probs_ab * jnp.log(probs_ab + _ENTROPY_EPS)),
  }
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  # Every quantity is a mean over the N examples of the global batch (the loss sums the two
  # directions of each example), as the official per-replica means averaged over replicas.
  means = {k: v / n_global for k, v in sums.items()}
  return means.pop('loss'), means


def nt_xent(z1: jnp.ndarray, z2: jnp.ndarray, temperature: float,
            mesh: Mesh | None = None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Official SimCLR contrastive loss of two views' projections z1, z2: [N, d].

  loss = mean over the N examples of (CE of view-1 anchor + CE of view-2 anchor), each anchor
  against the 2N - 1 other views of the global batch. With `mesh` (more than one device) z1 and
  z2 are global arrays sharded on "data" and each device computes its own rows against the
  gathered batch. Returns (loss, metrics): `contrastive_acc`, the fraction of view-1 anchors whose
  top view-2 key is their positive, and `contrastive_entropy`, the mean entropy of the softmax
  over those N view-2 keys (the official update_pretrain_metrics_train).
  """
  if mesh is None or mesh.size == 1:
    return _nt_xent_local(z1, z2, temperature, axis_name=None)
  fn = jax.shard_map(partial(_nt_xent_local, temperature=temperature, axis_name=DATA_AXIS),
                     mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS)), out_specs=(P(), P()))
  return fn(z1, z2)


def probe_loss(logits: jnp.ndarray, labels: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Softmax cross-entropy and accuracy of the probe, ignoring examples labelled -1."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)),
                                 axis=-1)
  valid = (labels >= 0).astype(log_probs.dtype)
  safe = jnp.maximum(labels, 0)
  nll = -jnp.take_along_axis(log_probs, safe[:, None], axis=-1)[:, 0]
  count = jnp.maximum(jnp.sum(valid), 1.0)
  loss = jnp.sum(nll * valid) / count
  acc = jnp.sum((jnp.argmax(logits, -1) == safe) * valid) / count
  return loss, acc


def kd_loss(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
            temperature: float) -> jnp.ndarray:
  """SimCLRv2's distillation loss, official `add_kd_loss` (tf2/colabs/distillation_self_training):

  teacher_probs = softmax(teacher_logits / T);
  mean(T**2 * softmax_cross_entropy_with_logits(teacher_probs, student_logits / T)).
  The T² keeps the gradient's scale independent of T. The teacher's logits get no gradient.
  """
  teacher_probs = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
  log_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  return jnp.mean(temperature**2 * -jnp.sum(teacher_probs * log_student, axis=-1))
