"""The encoder's variables as a PyTorch state dict with torchvision's ResNet key names (numpy).

Keys follow torchvision's `ResNet`: `conv1`/`bn1` for the stem, `layer{s}.{b}.conv{i}`/`bn{i}`
for the i-th convolution of block b of stage s, `layer{s}.{b}.downsample.0`/`.1` for a projection
shortcut. Convolution kernels go from flax's HWIO to torch's OIHW; batch norm scale/bias/mean/var
become weight/bias/running_mean/running_var (epsilon 1e-5 on both sides), plus torch's
`num_batches_tracked` counter (0: unused in eval mode).

The mapping walks the parameter tree rather than assuming module names: the convolutions and
norms of a block are numbered in the order the forward pass calls them (recorded with
`nn.intercept_methods` under `jax.eval_shape`, so nothing runs); only the projection shortcut is
recognised by name (it can run before the main path, and in stage 1 of a bottleneck ResNet it
has the same shape as the block's last convolution).

SimCLRv2's options have no torchvision names; they take timm's where timm has the same layer:
the ResNet-D stem is `conv1.0`/`.1`/`.3`/`.4`/`.6` (three 3x3 convolutions and two norms, as
timm's deep stem) before `bn1`; a ResNet-D shortcut is `downsample.1`/`.2` (the average pool at
index 0 has no parameters); squeeze-excitation is `se.fc1`/`se.fc2` (1x1 convolutions with
bias). A selective-kernel block keeps `conv2`/`bn2` for its two-stream 3x3 convolution and adds
`sk.fc1`, `sk.bn`, `sk.fc2` for the mixing branch. `torch_resnet.py` builds all of these.
"""
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_BLOCK = re.compile(r'stage(\d+)_block(\d+)')
_PROJECTION_WORDS = ('proj', 'shortcut', 'downsample')
# Named modules of the SimCLRv2 options -> their key under the block's prefix.
_NAMED = {('sk', 'mix_conv0'): 'sk.fc1', ('sk', 'mix_bn'): 'sk.bn', ('sk', 'mix_conv1'): 'sk.fc2',
          ('se', 'reduce'): 'se.fc1', ('se', 'expand'): 'se.fc2'}
# The ResNet-D stem's convolutions and norms, in call order (timm's deep-stem indices).
_DEEP_STEM = (('conv1.0', 'conv1.3', 'conv1.6'), ('conv1.1', 'conv1.4', 'bn1'))
# torchvision's ResNets: depth -> (block kind, blocks per stage); it has no ResNet-200.
TORCHVISION_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}

Path = tuple[str, ...]


def call_order(model: nn.Module, variables: Any, image_shape: tuple[int, int, int]
               ) -> dict[Path, int]:
  """{module path: index of its first call} in an inference forward of `model` (traced only)."""
  order: dict[Path, int] = {}

  def record(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
    if context.method_name == '__call__':
      order.setdefault(tuple(context.module.path), len(order))
    return next_fun(*args, **kwargs)

  def forward(v: Any) -> Any:
    with nn.intercept_methods(record):
      return model.apply(v, jnp.zeros((1, *image_shape), jnp.float32), train=False)

  jax.eval_shape(forward, variables)
  return order


def _module_leaves(tree: Any, prefix: Path = ()) -> dict[Path, dict[str, Any]]:
  """{path of a module: {leaf name: array}} for every module that owns leaves."""
  out: dict[Path, dict[str, Any]] = {}
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, 'items'):
      for path, leaves in _module_leaves(value, (*prefix, key)).items():
        out.setdefault(path, {}).update(leaves)
    else:
      out.setdefault(prefix, {})[key] = value
  return out


def _conv(kernel: Any) -> np.ndarray:
  """flax HWIO kernel -> torch OIHW weight."""
  return np.ascontiguousarray(np.transpose(np.asarray(kernel, np.float32), (3, 2, 0, 1)))


def _bn(params: dict[str, Any], stats: dict[str, Any], key: str) -> dict[str, np.ndarray]:
  """flax BatchNorm (scale, bias, mean, var) -> torch BatchNorm2d's five state-dict entries."""
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  return {f'{key}.weight': f32(params['scale']), f'{key}.bias': f32(params['bias']),
          f'{key}.running_mean': f32(stats['mean']), f'{key}.running_var': f32(stats['var']),
          f'{key}.num_batches_tracked': np.zeros((), np.int64)}


def encoder_state_dict(model: nn.Module, variables: Any,
                       image_shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
  """The encoder of `model` (a SimCLR module with an 'encoder' submodule) as a torch state dict.

  `variables` is {'params', 'batch_stats'} of the whole SimCLR model; the projection head and
  the probe are left out (torchvision's `fc` is to be replaced by `nn.Identity()`).
  """
  order = call_order(model, variables, image_shape)
  params = _module_leaves(variables['params']['encoder'])
  stats = _module_leaves(variables['batch_stats']['encoder'])
  modules = sorted(params, key=lambda p: order.get(('encoder', *p), len(order)))
  resnet_d = getattr(model, 'sk_ratio', 0.0) > 0  # official: the shortcut pools before its conv
  out: dict[str, np.ndarray] = {}
  counters: dict[str, list[int]] = {}  # prefix -> [convs, norms] numbered so far
  stem: tuple[list[tuple[Path, str]], list[tuple[Path, str]]] = ([], [])  # (convs, norms)
  for path in modules:
    leaves = params[path]
    block = next((i for i, name in enumerate(path) if _BLOCK.fullmatch(name)), None)
    if block is None:
      prefix, projection, named = '', False, None
    else:
      stage, index = map(int, _BLOCK.fullmatch(path[block]).groups())
      prefix = f'layer{stage}.{index - 1}.'
      projection = any(w in name for name in path[block + 1:] for w in _PROJECTION_WORDS)
      named = _NAMED.get(tuple(path[block + 1:]))
    count = counters.setdefault(prefix, [0, 0])
    down = ('downsample.1', 'downsample.2') if resnet_d else ('downsample.0', 'downsample.1')
    if named and 'kernel' in leaves:  # a 1x1 convolution of the SK mixing or of SE
      out[f'{prefix}{named}.weight'] = _conv(leaves['kernel'])
      if 'bias' in leaves:
        out[f'{prefix}{named}.bias'] = np.asarray(leaves['bias'], np.float32)
    elif named:
      out.update(_bn(leaves, stats[path], f'{prefix}{named}'))
    elif 'kernel' in leaves and np.ndim(leaves['kernel']) == 4:
      count[0] += not projection
      key = f'{prefix}{down[0]}' if projection else f'{prefix}conv{count[0]}'
      out[f'{key}.weight'] = _conv(leaves['kernel'])
      if not prefix:
        stem[0].append(key)
    elif 'scale' in leaves and path in stats:
      count[1] += not projection
      key = f'{prefix}{down[1]}' if projection else f'{prefix}bn{count[1]}'
      out.update(_bn(leaves, stats[path], key))
      if not prefix:
        stem[1].append(key)
    else:
      raise ValueError(f'encoder module {"/".join(path)} with parameters {sorted(leaves)} is '
                       'neither a convolution nor a batch norm; the torch export does not know it.')
  if counters.get('', [0, 0]) == [3, 3]:  # the ResNet-D stem: timm's deep-stem names
    for keys, names in zip(stem, _DEEP_STEM):
      for key, name in zip(keys, names):
        for k in [k for k in out if k.startswith(f'{key}.')]:
          out[name + k[len(key):]] = out.pop(k)
  elif counters.get('', [0, 0]) != [1, 1]:
    raise ValueError(f'expected one stem convolution and one stem batch norm (three of each '
                     f'for the ResNet-D stem) outside the stage*_block* modules, found '
                     f'{counters.get("", [0, 0])}.')
  return out


def torchvision_shapes(depth: int) -> dict[str, tuple[int, ...]]:
  """Keys and shapes of `torchvision.models.resnet{depth}().state_dict()` without `fc`.

  Written from torchvision's ResNet definition (expansion 4 for bottlenecks, a downsample
  projection only where the stride or the channel count changes).
  """
  kind, blocks = TORCHVISION_DEPTHS[depth]
  expansion = 1 if kind == 'basic' else 4
  shapes: dict[str, tuple[int, ...]] = {}

  def conv(key: str, cout: int, cin: int, k: int) -> None:
    shapes[f'{key}.weight'] = (cout, cin, k, k)

  def bn(key: str, c: int) -> None:
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{key}.{name}'] = (c,)
    shapes[f'{key}.num_batches_tracked'] = ()

  conv('conv1', 64, 3, 7)
  bn('bn1', 64)
  inplanes = 64
  for s, num_blocks in enumerate(blocks):
    planes = 64 * 2**s
    for b in range(num_blocks):
      p = f'layer{s + 1}.{b}.'
      stride = 2 if s > 0 and b == 0 else 1
      if kind == 'basic':
        layers = [(planes, inplanes, 3), (planes, planes, 3)]
      else:
        layers = [(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)]
      for i, (cout, cin, k) in enumerate(layers, 1):
        conv(f'{p}conv{i}', cout, cin, k)
        bn(f'{p}bn{i}', cout)
      if b == 0 and (stride != 1 or inplanes != planes * expansion):
        conv(f'{p}downsample.0', planes * expansion, inplanes, 1)
        bn(f'{p}downsample.1', planes * expansion)
      inplanes = planes * expansion
  return shapes


def torchvision_model(state_dict: dict[str, np.ndarray]) -> str | None:
  """'resnet50' etc. if `state_dict` loads with strict=True into that torchvision model, else None.

  Same keys and shapes is also the same network here: the stride sits on the 3x3 convolution of
  bottlenecks in both, and every padding matches torchvision's except the stem max-pool's (see
  the README's 'Using the trained encoder').
  """
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  for depth in TORCHVISION_DEPTHS:
    if torchvision_shapes(depth) == shapes:
      return f'resnet{depth}'
  return None
