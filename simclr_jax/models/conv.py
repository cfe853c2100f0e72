"""The ResNet's 2-D convolution with the official fixed padding, in interchangeable implementations.

Padding follows the official `Conv2dFixedPadding` (tf2/resnet.py): a strided convolution pads
`kernel_size - 1` pixels, `(k - 1) // 2` before and the rest after, then runs VALID; a stride-1
convolution runs 'SAME', which for these kernels is the same symmetric padding. ('SAME' at stride
2 would pad (0, 1) on even inputs: a one-pixel shift against the official network.)

Implementations (`config.model.conv_impl`), all with flax `nn.Conv`'s parameter layout (one
'kernel' of shape [kh, kw, cin, cout]) so a checkpoint moves between them:
  'lax':    `lax.conv_general_dilated`, XLA's convolution.
  'im2col': the k*k shifted (strided) slices of the padded input concatenated on the channel axis,
            then one matmul with the kernel reshaped to [k*k*cin, cout]; its gradients are
            matmuls and pads too.
  'auto':   the fastest measured for the backend, resolved when the model is built: 'lax'
            everywhere. On CPU (jaxlib 0.10, README "Performance") XLA's forward and input-gradient
            convolutions already run at the rate of the equivalent matmul, while XLA's copies make
            im2col's patches cost more than the matmul itself (2-3x slower per layer). What is
            slow on CPU is YNNPACK's kernel-gradient convolution: parallel.CPU_XLA_FLAGS hands
            convolutions to Eigen instead. On GPU and TPU XLA's convolutions run on cuDNN and the
            TPU's convolution units; im2col was not measured there.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from simclr_jax.errors import ConfigError

IMPLS = ('auto', 'lax', 'im2col')
CONCRETE_IMPLS = IMPLS[1:]  # what 'auto' resolves to

def resolve_impl(impl: str) -> str:
  """The concrete implementation `impl` names ('auto': the fastest measured, see above)."""
  if impl not in IMPLS:
    raise ConfigError(f"config.model.conv_impl='{impl}' is not one of {list(IMPLS)}.")
  # 'lax' won on CPU (with parallel.CPU_XLA_FLAGS or without); see the module docstring.
  return 'lax' if impl == 'auto' else impl


def fixed_padding(kernel_size: int) -> tuple[int, int]:
  """(before, after) padding of the official FixedPadding: k - 1 in total, the odd pixel after."""
  pad_total = kernel_size - 1
  return pad_total // 2, pad_total - pad_total // 2


def _im2col(x: jnp.ndarray, kernel_size: int, strides: int) -> jnp.ndarray:
  """[n, ho, wo, k*k*c] patches of padded NHWC `x`, features ordered (dy, dx, c) as a kernel."""
  n, h, w, c = x.shape
  ho, wo = (h - kernel_size) // strides + 1, (w - kernel_size) // strides + 1
  cols = [lax.slice(x, (0, dy, dx, 0),
                    (n, dy + strides * (ho - 1) + 1, dx + strides * (wo - 1) + 1, c),
                    (1, strides, strides, 1))
          for dy in range(kernel_size) for dx in range(kernel_size)]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, strides: int = 1,
           impl: str = 'lax') -> jnp.ndarray:
  """NHWC `x` convolved with a square HWIO `kernel`, official fixed padding, by `impl`."""
  k, cout = kernel.shape[0], kernel.shape[-1]
  pad = fixed_padding(k)
  if impl == 'lax':
    return lax.conv_general_dilated(x, kernel, (strides, strides), (pad, pad),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if impl not in CONCRETE_IMPLS:
    raise ConfigError(f"config.model.conv_impl='{impl}' is not one of {list(CONCRETE_IMPLS)} "
                      "(resolve 'auto' first: conv.resolve_impl).")
  if k > 1:
    x = jnp.pad(x, ((0, 0), pad, pad, (0, 0)))
  patches = _im2col(x, k, strides)
  return lax.dot_general(patches, kernel.reshape(-1, cout), (((3,), (0,)), ((), ())))


class Conv(nn.Module):
  """Bias-free square 2-D convolution (NHWC) with fixed padding; parameters as flax nn.Conv.

  Named `Conv` so that auto-named instances are 'Conv_0', 'Conv_1', ... as with nn.Conv.
  """
  features: int
  kernel_size: int
  strides: int = 1
  impl: str = 'lax'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # The official layers use tf.keras VarianceScaling(): scale 1, fan_in, truncated normal.
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return conv2d(x, kernel, self.strides, self.impl)
