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
(`MaxPoolSame`). SimCLRv2's options, where the keys have them: the ResNet-D stem (`conv1.0` ...
`conv1.6`), average-pooled shortcuts (`downsample.1`/`.2`, `ShortcutPool`), selective-kernel
3x3 convolutions (`sk.*`, `SKMix`) and squeeze-excitation (`se.*`, `SqueezeExcite`).
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


def _conv(state: dict, key: str, stride: int = 1) -> nn.Conv2d:
  """The convolution state[key] describes: padding (k-1)//2 on every side, a bias if it has one."""
  cout, cin, k, _ = state[f'{key}.weight'].shape
  return nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2,
                   bias=f'{key}.bias' in state)


def _conv_bn(state: dict, key: str, stride: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
  """The convolution state[key] describes and its batch norm."""
  conv = _conv(state, key, stride)
  return conv, nn.BatchNorm2d(conv.out_channels, eps=1e-5)


class ShortcutPool(nn.Module):
  """The official ResNet-D shortcut's 2x2 average pool before its 1x1 convolution.

  Strided: zeros padded after each spatial axis (counted in the mean), then 2x2/stride windows.
  Stride 1: TF's 'SAME' 2x2 pool, whose padding (one after each axis) is left out of the mean.
  """

  def __init__(self, stride: int):
    super().__init__()
    self.stride = stride

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.pad(x, (0, 1, 0, 1))
    if self.stride > 1:
      return F.avg_pool2d(x, 2, self.stride)
    ones = F.pad(torch.ones_like(x[:1, :1, :-1, :-1]), (0, 1, 0, 1))
    return F.avg_pool2d(x, 2, 1) / F.avg_pool2d(ones, 2, 1)


class SKMix(nn.Module):
  """Selective kernels' mixing (official SK_Conv2D after its 3x3 convolution + BN + ReLU).

  The 2f channels are two streams of f; a 1x1 bottleneck (BN + ReLU) of their pooled sum gives
  two logits per channel, whose softmax over the streams weighs them.
  """

  def __init__(self, state: dict, prefix: str):
    super().__init__()
    self.fc1 = _conv(state, f'{prefix}fc1')
    self.bn = nn.BatchNorm2d(self.fc1.out_channels, eps=1e-5)
    self.fc2 = _conv(state, f'{prefix}fc2')

  def forward(self, y: torch.Tensor) -> torch.Tensor:
    streams = torch.stack(torch.chunk(y, 2, dim=1))  # [2, N, f, H, W]
    summary = streams.sum(0).mean(dim=(2, 3), keepdim=True)
    mixing = self.fc2(F.relu(self.bn(self.fc1(summary))))
    mixing = torch.softmax(torch.stack(torch.chunk(mixing, 2, dim=1)), dim=0)
    return (streams * mixing).sum(0)


class SqueezeExcite(nn.Module):
  """Official SE_Layer: x * sigmoid(fc2(relu(fc1(mean over H, W of x)))), 1x1 convs with bias."""

  def __init__(self, state: dict, prefix: str):
    super().__init__()
    self.fc1, self.fc2 = _conv(state, f'{prefix}fc1'), _conv(state, f'{prefix}fc2')

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    s = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
    return torch.sigmoid(s) * x


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
    self.sk = SKMix(state, f'{prefix}sk.') if f'{prefix}sk.fc1.weight' in state else None
    self.se = (SqueezeExcite(state, f'{prefix}se.') if f'{prefix}se.fc1.weight' in state
               else None)
    self.downsample = None
    if f'{prefix}downsample.2.weight' in state:  # ResNet-D: pool, then a stride-1 projection
      self.downsample = nn.Sequential(ShortcutPool(stride),
                                      *_conv_bn(state, f'{prefix}downsample.1', 1))
    elif f'{prefix}downsample.0.weight' in state:
      self.downsample = nn.Sequential(*_conv_bn(state, f'{prefix}downsample.0', stride))
    self.relu = nn.ReLU(inplace=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    shortcut = x if self.downsample is None else self.downsample(x)
    for i in range(1, self.num_convs + 1):
      x = getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(x))
      if i < self.num_convs:
        x = self.relu(x)
        if i == 2 and self.sk is not None:  # the two-stream 3x3 convolution's mixing
          x = self.sk(x)
    if self.se is not None:
      x = self.se(x)
    return self.relu(x + shortcut)


class ResNet(nn.Module):
  """The simclr_jax encoder: stem, four stages, global average pool; returns h [N, dim]."""

  def __init__(self, state: dict):
    super().__init__()
    if 'conv1.0.weight' in state:  # ResNet-D stem: 3x3/2, 3x3, 3x3 (timm's deep-stem indices)
      c0, b0 = _conv_bn(state, 'conv1.0', 2)
      c1, b1 = _conv_bn(state, 'conv1.3', 1)
      self.conv1 = nn.Sequential(c0, b0, nn.ReLU(inplace=True), c1, b1, nn.ReLU(inplace=True),
                                 _conv(state, 'conv1.6'))
      self.bn1 = nn.BatchNorm2d(self.conv1[-1].out_channels, eps=1e-5)
      cifar_stem = False
    else:
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
