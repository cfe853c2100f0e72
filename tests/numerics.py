"""Tolerances from the arithmetic, and float64 references of the model, for the tests.

Two float32 computations of the same quantity by different programs (another device layout,
another chunking, another library) differ by rounding whose size depends on the summation
order each CPU's kernels choose. A bound read off one CPU's result fails on the next. So:

- where the two sides are the same program on the same inputs, compare bit for bit;
- where a reduction of L terms is summed in another order, bound by float32's growth over L
  (`sum_rtol`), relative to the largest magnitude involved;
- where a test needs tightness through a deep network (gradients through BN and a ResNet),
  run both sides in float64 (`float64`, `to_float64`): rounding then sits near 1e-13 whatever
  the CPU does, so a bound like `F64_RTOL` is far above any summation order and far below the
  error a wrong computation makes.
"""
import contextlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7, float32's spacing at 1
EPS64 = float(np.finfo(np.float64).eps)  # 2.2e-16
# Two float64 runs of the same maths through a ResNet step (forward, BN, NT-Xent, backward):
# float32 runs of these tests differ by up to ~1e-5 relative (~2^7 float32 ulps amplified
# through BN's backward); the same amplification of float64's eps gives ~3e-14. 1e-9 is
# 10^4 times that, and 10^6 times below the 1e-3 that a wrong sharding or chunking makes.
F64_RTOL = 1e-9
# Features h of the same images from two float32 inference programs (other batch sizes, device
# layouts, XLA builds, or torch): each of the ~20 layers sums L ≤ 4608 products (ResNet-50's
# 3x3x512; 288 in the tests' ResNet-18 x1/16), a typical relative rounding of √L·u ≤ 4e-6
# (u = EPS32 / 2), which inference-mode BN and ReLU pass on without amplifying; twenty such
# layers add up to ≤ 8e-5 even if every layer's error pointed the same way. A wrong crop, row,
# padding or BN statistic moves h by 1e-2 relative or more.
FEATURE_RTOL = 1e-4


def rel_err(got: Any, want: Any) -> float:
  """‖got − want‖ / ‖want‖ (Frobenius, in float64); ‖got‖ when want is zero."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def sum_rtol(terms: int, eps: float = EPS32) -> float:
  """Worst-case relative error of a sum of `terms` values in floating point (Higham's
  γ_n = n·u/(1 − n·u), u = eps/2), relative to the sum of their magnitudes; two summation
  orders differ by at most twice this."""
  u = eps / 2
  return 2 * terms * u / (1 - terms * u)


def assert_trees_close(got: Any, want: Any, rtol: float) -> None:
  """Every leaf of `got` within `rtol` (rel_err) of the same leaf of `want`, naming the leaf."""
  leaves, want_leaves = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)
  assert len(leaves) == len(want_leaves)
  for (path, a), b in zip(leaves, want_leaves):
    err = rel_err(a, b)
    assert err <= rtol, (jax.tree_util.keystr(path), err, rtol)


@contextlib.contextmanager
def float64() -> Iterator[None]:
  """JAX with 64-bit types for this block only (other tests in the process keep float32)."""
  with jax.enable_x64(True):
    yield


def to_float64(tree: Any) -> Any:
  """Floating leaves of `tree` as float64 (host numpy); other leaves unchanged."""
  def cast(x):
    x = np.asarray(x)
    return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x
  return jax.tree.map(cast, jax.device_get(tree))


def float64_model(model: Any) -> Any:
  """The same flax module computing in float64 (its parameters: `to_float64` of float32 ones)."""
  return model.clone(dtype=jnp.float64)
