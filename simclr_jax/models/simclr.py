"""The SimCLR network: encoder f → h, projection head g → z, and the online linear probe."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax.errors import ConfigError
from simclr_jax.models import conv, resnet

# The official LinearLayer (tf2/model.py), used by the projection head and the supervised head,
# initialises its dense kernel with `tf.keras.initializers.RandomNormal(stddev=0.01)`.
_HEAD_INIT = nn.initializers.normal(stddev=0.01)
# Top-level parameter collection of the online probe (the official 'head_supervised'): the
# optimiser's masks and the fine-tuning head find it by this name.
PROBE = 'probe'


class ProjectionHead(nn.Module):
  """`num_layers` bias-free dense layers, BN after each (no beta on the last), ReLU between."""
  num_layers: int = 2
  hidden_dim: int = 2048
  out_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jnp.ndarray, train: bool = True, upto: int | None = None) -> jnp.ndarray:
    """z, or with `upto`=k the output of layer k (0: h), building only layers < k.

    `upto` is the official fine-tuning input hiddens_list[ft_proj_selector]: the same layers
    under the same names, so a fine-tuning network restores them from the pretraining tree.
    """
    num = self.num_layers if upto is None else upto
    if not 0 <= num <= self.num_layers:
      raise ValueError(f'upto={upto} must be in [0, {self.num_layers}] (the head has '
                       f'{self.num_layers} layers).')
    x = h
    for i in range(num):
      last = i == self.num_layers - 1
      x = nn.Dense(self.out_dim if last else self.hidden_dim, use_bias=False,
                   kernel_init=_HEAD_INIT, dtype=self.dtype, name=f'dense{i}')(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=resnet.BN_MOMENTUM,
                       epsilon=resnet.BN_EPSILON, use_bias=not last, dtype=self.dtype,
                       use_fast_variance=False, name=f'bn{i}')(x)
      if not last:
        x = nn.relu(x)
    return x.astype(resnet.output_dtype(self.dtype))


class SimCLR(nn.Module):
  """Returns {'h': encoder features, 'z': projections, 'probe_logits': probe on sg(h)}."""
  depth: int = 50
  width: float = 1.0
  cifar_stem: bool = False
  num_proj_layers: int = 2
  proj_dim: int = 128
  num_classes: int = 0  # 0: no online probe
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'  # models/conv.py IMPLS
  remat: bool = False  # jax.checkpoint each residual block
  sk_ratio: float = 0.0  # resnet.ResNet: SimCLRv2 selective kernels (+ ResNet-D); 0: off
  se_ratio: float = 0.0  # resnet.ResNet: squeeze-excitation; 0: off

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> dict[str, jnp.ndarray]:
    h = resnet.ResNet(self.depth, self.width, self.cifar_stem, self.dtype,
                      conv_impl=self.conv_impl, remat=self.remat, sk_ratio=self.sk_ratio,
                      se_ratio=self.se_ratio, name='encoder')(x, train)
    z = ProjectionHead(self.num_proj_layers, h.shape[-1], self.proj_dim, self.dtype,
                       name='projection')(h, train)
    out = {'h': h, 'z': z}
    if self.num_classes:
      # The official SupervisedHead: LinearLayer(num_classes), a dense layer with bias (zeros)
      # and an N(0, 0.01^2) kernel, on a stopped gradient: it reads h, never shapes it.
      out['probe_logits'] = nn.Dense(self.num_classes, kernel_init=_HEAD_INIT,
                                     dtype=resnet.output_dtype(self.dtype),
                                     name=PROBE)(jax.lax.stop_gradient(h))
    return out


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}  # config.model.dtype → compute dtype


def compute_dtype(model_cfg: ml_collections.ConfigDict) -> Any:
  """The compute dtype config.model.dtype names; a ConfigError naming the key otherwise."""
  if model_cfg.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype='{model_cfg.dtype}' is not one of {sorted(DTYPES)}.")
  return DTYPES[model_cfg.dtype]


def _encoder_options(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """conv_impl ('auto' resolved), remat, sk_ratio and se_ratio; defaults for configs saved before
  these keys existed (the first two never change the parameters; the ratios were 0 then)."""
  ratios = {k: float(model_cfg.get(k, 0.0)) for k in ('sk_ratio', 'se_ratio')}
  for key, value in ratios.items():
    if value < 0:
      raise ConfigError(f'config.model.{key}={value} must be >= 0 (0: off; the published SK '
                        'models use sk_ratio=0.0625).')
  return {'conv_impl': conv.resolve_impl(model_cfg.get('conv_impl', 'auto')),
          'remat': bool(model_cfg.get('remat', False)), **ratios}


def encoder_from_config(model_cfg: ml_collections.ConfigDict, **overrides: Any) -> resnet.ResNet:
  """The encoder `config.model` describes, with its conv_impl ('auto' resolved) and remat.

  `overrides` set other ResNet fields (e.g. train_from_stage for fine-tuning).
  """
  fields = dict(depth=model_cfg.depth, width=model_cfg.width, cifar_stem=model_cfg.cifar_stem,
                dtype=compute_dtype(model_cfg), **_encoder_options(model_cfg))
  return resnet.ResNet(**{**fields, **overrides})


def from_config(model_cfg: ml_collections.ConfigDict, num_classes: int) -> SimCLR:
  """Builds the SimCLR module from `config.model` and the data set's number of classes."""
  dtype = compute_dtype(model_cfg)
  if model_cfg.num_proj_layers < 1:
    raise ConfigError(f'config.model.num_proj_layers={model_cfg.num_proj_layers} must be >= 1.')
  return SimCLR(depth=model_cfg.depth, width=model_cfg.width, cifar_stem=model_cfg.cifar_stem,
                num_proj_layers=model_cfg.num_proj_layers, proj_dim=model_cfg.proj_dim,
                num_classes=num_classes, dtype=dtype, **_encoder_options(model_cfg))
