"""ResNet v1 encoders (18/34 basic, 50/101/152/200 bottleneck) as the official tf2/resnet.py.

As the official code: stride on the 3x3 convolution of bottleneck blocks (ResNet-50 has 23.5M
parameters); strided convolutions pad (k - 1) // 2 before and the rest after, then run VALID
(`Conv2dFixedPadding`, models/conv.py); a projection shortcut (1x1 convolution + BN, no ReLU) on
the first block of every stage (`BlockGroup`'s `use_projection=True`), whether or not the shape
changes; the stem's max-pool is 3x3 stride 2 'SAME'. BN momentum 0.9 and epsilon 1e-5; the last
BN of every residual block starts with gamma = 0 so each block starts as an identity, which the
SimCLR paper's large-batch LARS training relies on.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.errors import ConfigError
from simclr_jax.models import conv as conv_lib

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# depth -> (block kind, blocks per stage)
STAGES: dict[int, tuple[str, Sequence[int]]] = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
    200: ('bottleneck', (3, 24, 36, 3)),
}


class _Block(nn.Module):
  """Fields shared by both residual blocks; `conv` and `norm` are module factories."""
  filters: int
  strides: int
  use_projection: bool
  conv: Any
  norm: Any

  def shortcut(self, x: jnp.ndarray, out_filters: int) -> jnp.ndarray:
    """x, or on a block with a projection, the official one: 1x1 convolution + BN, no ReLU."""
    if not self.use_projection:
      return x
    return self.norm(name='proj_bn')(
        self.conv(out_filters, 1, self.strides, name='proj_conv')(x))


class BasicBlock(_Block):
  """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    shortcut = self.shortcut(x, self.filters)
    y = self.conv(self.filters, 3, self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, 3)(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    return nn.relu(y + shortcut)


class BottleneckBlock(_Block):
  """1x1 → 3x3 (strided) → 1x1 (4x filters) with a residual connection (ResNet-50+)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    out_filters = 4 * self.filters
    shortcut = self.shortcut(x, out_filters)
    y = nn.relu(self.norm()(self.conv(self.filters, 1)(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, 3, self.strides)(y)))
    y = self.conv(out_filters, 1)(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet v1 trunk returning the globally average-pooled representation h."""
  depth: int = 50
  width: float = 1.0
  cifar_stem: bool = False
  dtype: Any = jnp.float32
  # Fine-tuning from stage k (1..4): the stem and stages before k are frozen (BN in inference
  # mode, no gradient through them); 0 trains everything. Same parameter tree either way.
  train_from_stage: int = 0
  conv_impl: str = 'auto'  # models/conv.py IMPLS; same parameters whichever is used
  # Recompute each residual block's activations in the backward pass instead of keeping them
  # (jax.checkpoint): less memory on GPU/TPU, about one more forward pass of compute.
  remat: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    if self.depth not in STAGES:
      raise ConfigError(f'config.model.depth={self.depth} is not a ResNet depth; '
                        f'choose one of {sorted(STAGES)}.')
    kind, blocks = STAGES[self.depth]
    block_cls = BasicBlock if kind == 'basic' else BottleneckBlock
    if self.remat:
      block_cls = nn.remat(block_cls)
    conv = functools.partial(conv_lib.Conv, impl=conv_lib.resolve_impl(self.conv_impl),
                             dtype=self.dtype)
    # Two-pass variance: E[x²]-E[x]² loses ~1e-4 relative precision in float32, enough to make
    # a sharded step drift from the single-device one; the extra pass is cheap.
    def norm(trained: bool = True) -> Any:
      return functools.partial(nn.BatchNorm, use_running_average=not (train and trained),
                               momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype,
                               use_fast_variance=False)
    base = max(1, int(round(64 * self.width)))

    x = x.astype(self.dtype)
    if self.cifar_stem:
      x = conv(base, 3, name='stem_conv')(x)
    else:
      x = conv(base, 7, 2, name='stem_conv')(x)
    stem_trained = self.train_from_stage == 0
    x = nn.relu(norm(stem_trained)(name='stem_bn')(x))
    if not self.cifar_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    if not stem_trained:
      x = jax.lax.stop_gradient(x)
    for stage, num_blocks in enumerate(blocks):
      trained = stage + 1 >= self.train_from_stage
      for i in range(num_blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        x = block_cls(base * 2**stage, strides, i == 0, conv, norm(trained),
                      name=f'stage{stage + 1}_block{i + 1}')(x)
      if not trained:
        x = jax.lax.stop_gradient(x)
    return jnp.mean(x, axis=(1, 2)).astype(output_dtype(self.dtype))


def output_dtype(compute_dtype: Any) -> Any:
  """What the network hands on (h, z, logits): at least float32, so bfloat16 compute feeds the
  loss float32, while float64 (the tests' exact references) stays float64, as flax's BN does."""
  return jnp.promote_types(compute_dtype, jnp.float32)


def feature_dim(depth: int, width: float) -> int:
  """Size of h for a ResNet of this depth and width (512w for basic, 2048w for bottleneck)."""
  kind, _ = STAGES[depth]
  base = max(1, int(round(64 * width)))
  return base * 8 * (1 if kind == 'basic' else 4)
