"""The SimCLR network: encoder f → h, projection head g → z, and the online linear probe."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax.models import resnet

# The official code initialises the head's dense layers with N(0, 0.01^2).
_HEAD_INIT = nn.initializers.normal(stddev=0.01)


class ProjectionHead(nn.Module):
  """`num_layers` bias-free dense layers, BN after each (no beta on the last), ReLU between."""
  num_layers: int = 2
  hidden_dim: int = 2048
  out_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    x = h
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.out_dim if last else self.hidden_dim, use_bias=False,
                   kernel_init=_HEAD_INIT, dtype=self.dtype, name=f'dense{i}')(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=resnet.BN_MOMENTUM,
                       epsilon=resnet.BN_EPSILON, use_bias=not last, dtype=self.dtype,
                       use_fast_variance=False, name=f'bn{i}')(x)
      if not last:
        x = nn.relu(x)
    return x.astype(jnp.float32)


class SimCLR(nn.Module):
  """Returns {'h': encoder features, 'z': projections, 'probe_logits': probe on sg(h)}."""
  depth: int = 50
  width: float = 1.0
  cifar_stem: bool = False
  num_proj_layers: int = 2
  proj_dim: int = 128
  num_classes: int = 0  # 0: no online probe
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> dict[str, jnp.ndarray]:
    h = resnet.ResNet(self.depth, self.width, self.cifar_stem, self.dtype, name='encoder')(x, train)
    z = ProjectionHead(self.num_proj_layers, h.shape[-1], self.proj_dim, self.dtype,
                       name='projection')(h, train)
    out = {'h': h, 'z': z}
    if self.num_classes:
      # The probe sees a stopped gradient: it reads the representation, never shapes it.
      out['probe_logits'] = nn.Dense(self.num_classes, dtype=jnp.float32,
                                     name='probe')(jax.lax.stop_gradient(h))
    return out


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}  # config.model.dtype → compute dtype


def compute_dtype(model_cfg: ml_collections.ConfigDict) -> Any:
  """The compute dtype config.model.dtype names; a ValueError naming the key otherwise."""
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype='{model_cfg.dtype}' is not one of {sorted(DTYPES)}.")
  return DTYPES[model_cfg.dtype]


def from_config(model_cfg: ml_collections.ConfigDict, num_classes: int) -> SimCLR:
  """Builds the SimCLR module from `config.model` and the data set's number of classes."""
  dtype = compute_dtype(model_cfg)
  if model_cfg.num_proj_layers < 1:
    raise ValueError(f'config.model.num_proj_layers={model_cfg.num_proj_layers} must be >= 1.')
  return SimCLR(depth=model_cfg.depth, width=model_cfg.width, cifar_stem=model_cfg.cifar_stem,
                num_proj_layers=model_cfg.num_proj_layers, proj_dim=model_cfg.proj_dim,
                num_classes=num_classes, dtype=dtype)
