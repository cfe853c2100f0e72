"""A PyTorch ResNet that loads any simclr_jax torch export exactly (needs only torch).

The export job writes a copy of this file beside `encoder.safetensors`; use it where torchvision
has no equal model (ResNet-18/34, whose first stage here has a projection shortcut; ResNet-200;
widths other than 1; the CIFAR stem):

  import torch_resnet
  encoder = torch_resnet.load_encoder('EXPORT_DIR')  # eval mode; returns h [N, dim]
  h = encoder(images)  # float [N, 3, H, W] in [0, 1], no mean/std normalisation

The network is built from the state dict's own keys and shapes, with torchvision's names
(conv1, bn1, layer1..layer4, downsample), so the weights load with strict=True. Paddings equal
the JAX model's: the official fixed padding of strided convolutions is torchvision's symmetric
padding=(k-1)//2 for the odd kernels used here, and the stem max-pool pads like TF's 'SAME'
(`MaxPoolSame`).
"""
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = 'encoder.safetensors'
EXPORT_FILE = 'export.json'


class MaxPoolSame(nn.Module):
  """3x3/2 max-pool with TF's 'SAME' padding: (0, 1) per axis of even size, (1, 1) of odd.

  torchvision's MaxPool2d(3, 2, padding=1) pads (1, 1) always, so on even sizes its windows sit
  one pixel earlier than the JAX/TF model's.
  """

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    x = F.pad(x, (w % 2, 1, h % 2, 1), value=float('-inf'))
    return F.max_pool2d(x, 3, 2)


def _conv_bn(state: dict, key: str, stride: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
  """The convolution state[key] describes (padding (k-1)//2 on every side) and its batch norm."""
  cout, cin, k, _ = state[f'{key}.weight'].shape
  conv = nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, bias=False)
  return conv, nn.BatchNorm2d(cout, eps=1e-5)


class Block(nn.Module):
  """A basic (2 convolutions) or bottleneck (3) residual block; the stride on the 3x3 one."""

  def __init__(self, state: dict, prefix: str, stride: int):
    super().__init__()
    self.num_convs = 3 if f'{prefix}conv3.weight' in state else 2
    strided = 1 if self.num_convs == 2 else 2  # the first 3x3 convolution
    for i in range(1, self.num_convs + 1):
      conv, bn = _conv_bn(state, f'{prefix}conv{i}', stride if i == strided else 1)
      setattr(self, f'conv{i}', conv)
      setattr(self, f'bn{i}', bn)
    self.downsample = None
    if f'{prefix}downsample.0.weight' in state:
      self.downsample = nn.Sequential(*_conv_bn(state, f'{prefix}downsample.0', stride))
    self.relu = nn.ReLU(inplace=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    shortcut = x if self.downsample is None else self.downsample(x)
    for i in range(1, self.num_convs + 1):
      x = getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(x))
      if i < self.num_convs:
        x = self.relu(x)
    return self.relu(x + shortcut)


class ResNet(nn.Module):
  """The simclr_jax encoder: stem, four stages, global average pool; returns h [N, dim]."""

  def __init__(self, state: dict):
    super().__init__()
    k = state['conv1.weight'].shape[-1]
    cifar_stem = k == 3  # the CIFAR stem: 3x3 stride 1, no max-pool
    self.conv1, self.bn1 = _conv_bn(state, 'conv1', 1 if cifar_stem else 2)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.Identity() if cifar_stem else MaxPoolSame()
    for s in range(1, 5):
      count = sum(1 for key in state
                  if key.startswith(f'layer{s}.') and key.endswith('.conv1.weight'))
      blocks = [Block(state, f'layer{s}.{b}.', 2 if s > 1 and b == 0 else 1)
                for b in range(count)]
      setattr(self, f'layer{s}', nn.Sequential(*blocks))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Identity()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def load_encoder(export_dir: str) -> ResNet:
  """The exported encoder in eval mode, weights loaded with strict=True."""
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  state = load_file(os.path.join(export_dir, WEIGHTS_FILE))
  model = ResNet(state)
  model.load_state_dict(state, strict=True)
  meta_path = os.path.join(export_dir, EXPORT_FILE)
  if os.path.exists(meta_path):
    with open(meta_path, encoding='utf-8') as f:
      model.export_info = json.load(f)
  return model.eval()
