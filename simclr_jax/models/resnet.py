"""ResNet v1 encoders (18/34 basic, 50/101/152/200 bottleneck) as the official tf2/resnet.py.

As the official code: stride on the 3x3 convolution of bottleneck blocks (ResNet-50 has 23.5M
parameters); strided convolutions pad (k - 1) // 2 before and the rest after, then run VALID
(`Conv2dFixedPadding`, models/conv.py); a projection shortcut (1x1 convolution + BN, no ReLU) on
the first block of every stage (`BlockGroup`'s `use_projection=True`), whether or not the shape
changes; the stem's max-pool is 3x3 stride 2 'SAME'. BN momentum 0.9 and epsilon 1e-5; the last
BN of every residual block starts with gamma = 0 so each block starts as an identity, which the
SimCLR paper's large-batch LARS training relies on.

SimCLRv2's options, as the official code switches them on:
- `sk_ratio` > 0: selective-kernel 3x3 convolutions in bottleneck blocks (`SKConv`), and the
  ResNet-D changes the official code ties to the same flag: a stem of three 3x3 convolutions
  (widths w/2, w/2, w; the first strided) instead of the 7x7, and projection shortcuts that
  average-pool 2x2 (strided blocks: pad 0 before, 1 after, then VALID; others: 'SAME' with
  padding left out of the mean) before a stride-1 1x1 convolution. Basic blocks keep their 3x3
  convolutions and get only the shortcut.
- `se_ratio` > 0: squeeze-excitation (`SqueezeExcite`) on every block's residual branch after
  its last BN, squeezing to max(1, int(filters * se_ratio)) channels, where filters is the
  block's base width (not 4x for bottleneck blocks).
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


# Official SK_Conv2D's floor on the width of its mixing bottleneck (`min_dim=32`).
SK_MIN_DIM = 32


class SKConv(nn.Module):
  """Selective-kernel 3x3 convolution + BN + ReLU (official `SK_Conv2D`).

  One 3x3 convolution makes two streams of `filters` channels each (BN + ReLU over both); a
  global-pooled summary of their sum goes through a 1x1 bottleneck (BN + ReLU) and a 1x1
  convolution to two logits per channel, whose softmax over the streams weighs them.
  """
  filters: int
  strides: int
  sk_ratio: float
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = nn.relu(self.norm(name='bn')(self.conv(2 * self.filters, 3, self.strides,
                                               name='conv')(x)))
    streams = jnp.stack(jnp.split(y, 2, axis=-1))  # [2, N, H, W, filters]
    summary = jnp.mean(jnp.sum(streams, axis=0), axis=(1, 2), keepdims=True)
    mid = max(int(self.filters * self.sk_ratio), SK_MIN_DIM)
    summary = nn.relu(self.norm(name='mix_bn')(self.conv(mid, 1, name='mix_conv0')(summary)))
    mixing = self.conv(2 * self.filters, 1, name='mix_conv1')(summary)
    mixing = jax.nn.softmax(jnp.stack(jnp.split(mixing, 2, axis=-1)), axis=0)
    return jnp.sum(streams * mixing, axis=0)


class SqueezeExcite(nn.Module):
  """Official `SE_Layer`: x * sigmoid(expand(relu(reduce(mean over H, W of x)))), 1x1 convs
  with biases; `reduced` channels in the middle, x's channels out."""
  reduced: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(nn.Conv(self.reduced, (1, 1), dtype=self.dtype, name='reduce')(s))
    s = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name='expand')(s)
    return jax.nn.sigmoid(s) * x


def _resnet_d_pool(x: jnp.ndarray, strides: int) -> jnp.ndarray:
  """ResNet-D shortcut pooling as official: 2x2 average, strided after padding (0, 1) with
  zeros that count in the mean; at stride 1 'SAME', the padding left out of the mean."""
  if strides > 1:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.avg_pool(x, (2, 2), strides=(strides, strides), padding='VALID')
  return nn.avg_pool(x, (2, 2), strides=(1, 1), padding='SAME', count_include_pad=False)


class _Block(nn.Module):
  """Fields shared by both residual blocks; `conv` and `norm` are module factories."""
  filters: int
  strides: int
  use_projection: bool
  conv: Any
  norm: Any
  sk_ratio: float = 0.0
  se_ratio: float = 0.0

  def shortcut(self, x: jnp.ndarray, out_filters: int) -> jnp.ndarray:
    """x, or on a block with a projection, the official one: 1x1 convolution + BN, no ReLU
    (with sk_ratio > 0, ResNet-D: 2x2 average pooling carries the stride instead)."""
    if not self.use_projection:
      return x
    if self.sk_ratio > 0:
      x = self.conv(out_filters, 1, name='proj_conv')(_resnet_d_pool(x, self.strides))
    else:
      x = self.conv(out_filters, 1, self.strides, name='proj_conv')(x)
    return self.norm(name='proj_bn')(x)

  def excite(self, y: jnp.ndarray) -> jnp.ndarray:
    """The residual branch, squeeze-excited when se_ratio > 0."""
    if self.se_ratio <= 0:
      return y
    return SqueezeExcite(max(1, int(self.filters * self.se_ratio)), y.dtype, name='se')(y)


class BasicBlock(_Block):
  """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    shortcut = self.shortcut(x, self.filters)
    y = self.conv(self.filters, 3, self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, 3)(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    return nn.relu(self.excite(y) + shortcut)


class BottleneckBlock(_Block):
  """1x1 → 3x3 (strided) → 1x1 (4x filters) with a residual connection (ResNet-50+)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    out_filters = 4 * self.filters
    shortcut = self.shortcut(x, out_filters)
    y = nn.relu(self.norm()(self.conv(self.filters, 1)(x)))
    if self.sk_ratio > 0:
      y = SKConv(self.filters, self.strides, self.sk_ratio, self.conv, self.norm, name='sk')(y)
    else:
      y = nn.relu(self.norm()(self.conv(self.filters, 3, self.strides)(y)))
    y = self.conv(out_filters, 1)(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    return nn.relu(self.excite(y) + shortcut)


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
  sk_ratio: float = 0.0  # SimCLRv2 selective kernels (+ ResNet-D stem and shortcuts); 0: off
  se_ratio: float = 0.0  # squeeze-excitation; 0: off

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
    stem_trained = self.train_from_stage == 0
    if self.cifar_stem:
      x = conv(base, 3, name='stem_conv')(x)
    elif self.sk_ratio > 0:  # ResNet-D stem, as official with sk_ratio > 0
      for i, strides in enumerate((2, 1)):
        x = conv(base // 2, 3, strides, name=f'stem_conv{i}')(x)
        x = nn.relu(norm(stem_trained)(name=f'stem_bn{i}')(x))
      x = conv(base, 3, name='stem_conv')(x)
    else:
      x = conv(base, 7, 2, name='stem_conv')(x)
    x = nn.relu(norm(stem_trained)(name='stem_bn')(x))
    if not self.cifar_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    if not stem_trained:
      x = jax.lax.stop_gradient(x)
    for stage, num_blocks in enumerate(blocks):
      trained = stage + 1 >= self.train_from_stage
      for i in range(num_blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        x = block_cls(base * 2**stage, strides, i == 0, conv, norm(trained), self.sk_ratio,
                      self.se_ratio, name=f'stage{stage + 1}_block{i + 1}')(x)
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
