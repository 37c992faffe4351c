"""Test helper: the authors' PyTorch Bi-Real nets, rebuilt from the layout facts in
docs/reference.md.

Only what a converter test needs: the forward pass in eval mode and a state dict whose keys and
shapes are those of the official checkpoints (`BiReal18_34` keeps binary kernels flat as
`binary_conv.weights` [cout*cin*3*3, 1]; `BiReal_50` keeps them 4-D as `weight`). Semantics follow
the official code, including `torch.sign(0) == 0` and zero padding applied after the sign.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

ARCHS = {
    "bireal18": ("basic", (4, 4, 4, 4)),
    "bireal34": ("basic", (6, 8, 12, 6)),
    "bireal50": ("bottleneck", (3, 4, 6, 3)),
    "bireal152": ("bottleneck", (3, 8, 36, 3)),
}


def _binarize_kernel(w: torch.Tensor) -> torch.Tensor:
  """α·sign(W), α = mean |W| per output channel (OIHW: over I, H, W)."""
  return w.abs().mean(dim=(1, 2, 3), keepdim=True) * torch.sign(w)


def _leaky_clip(x: torch.Tensor) -> torch.Tensor:
  return torch.where(x < -1, 0.1 * x - 0.9, torch.where(x > 1, 0.1 * x + 0.9, x))


class FlatBinaryConv(nn.Module):
  """Binary 3×3 conv of Bi-Real-18/34: the latent kernel is one flat column `weights`."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.shape, self.stride = (cout, cin, 3, 3), stride
    self.weights = nn.Parameter(torch.empty(cout * cin * 9, 1))

  def forward(self, x):
    return F.conv2d(x, _binarize_kernel(self.weights.view(self.shape)), stride=self.stride,
                    padding=1)


class BinaryConv4d(nn.Module):
  """Binary conv of Bi-Real-50: the latent kernel is a normal OIHW `weight`."""

  def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
    super().__init__()
    self.stride, self.pad = stride, k // 2
    self.weight = nn.Parameter(torch.empty(cout, cin, k, k))

  def forward(self, x):
    return F.conv2d(x, _binarize_kernel(self.weight), stride=self.stride, padding=self.pad)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential:
  # Indices 0/1/2 give the checkpoint keys downsample.1.weight and downsample.2.*.
  return nn.Sequential(nn.AvgPool2d(stride, stride), nn.Conv2d(cin, cout, 1, bias=False),
                       nn.BatchNorm2d(cout))


class Basic(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.binary_conv = FlatBinaryConv(cin, cout, stride)
    self.bn1 = nn.BatchNorm2d(cout)
    self.downsample = _shortcut(cin, cout, stride) if (stride != 1 or cin != cout) else None

  def forward(self, x):
    y = self.bn1(self.binary_conv(torch.sign(x)))
    return y + (x if self.downsample is None else self.downsample(x))


class Bottleneck(nn.Module):
  """Two streams (x1 mid width, x2 full width); every conv has its own shortcut."""

  def __init__(self, cin: int, cout: int, stride: int, downsample: bool, first: bool):
    super().__init__()
    mid = cout // 4
    self.first, self.down, self.stride = first, downsample, stride
    self.conv1 = nn.Conv2d(cin, mid, 1, bias=False) if first else BinaryConv4d(cin, mid, 1)
    self.bn1 = nn.BatchNorm2d(mid)
    self.conv2 = BinaryConv4d(mid, mid, 3, stride)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = BinaryConv4d(mid, cout, 1)
    self.bn3 = nn.BatchNorm2d(cout)
    if downsample:
      # The official first block owns this conv too, but never uses it.
      self.down_conv1x1 = nn.Conv2d(cin // 4, mid, 1, bias=False)
      self.downsample = _shortcut(cin, cout, stride)

  def forward(self, x1, x2):
    a = _leaky_clip(x2) if self.first else torch.sign(x2)
    out1 = self.bn1(self.conv1(a))
    if not self.first:
      out1 = out1 + (self.down_conv1x1(x1) if self.down else x1)
    out2 = self.bn2(self.conv2(torch.sign(out1)))
    out2 = out2 + (F.avg_pool2d(out1, 2, 2) if self.down and self.stride == 2 else out1)
    out3 = self.bn3(self.conv3(torch.sign(out2)))
    return out2, out3 + (self.downsample(x2) if self.down else x2)


class TorchBiRealNet(nn.Module):
  def __init__(self, name: str, num_classes: int = 1000):
    super().__init__()
    self.block, stages = ARCHS[name]
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    if self.block == "basic":
      cin = 64
      for s, n in enumerate(stages):
        cout = 64 * 2**s
        blocks = []
        for i in range(n):
          blocks.append(Basic(cin, cout, 2 if (s > 0 and i == 0) else 1))
          cin = cout
        setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
      width = 512
    else:
      self.layers = nn.ModuleList()
      cin = 64
      for s, n in enumerate(stages):
        cout = 256 * 2**s
        for i in range(n):
          self.layers.append(Bottleneck(cin, cout, 2 if (s > 0 and i == 0) else 1,
                                        downsample=(i == 0), first=(s == 0 and i == 0)))
          cin = cout
      width = 2048
    self.fc = nn.Linear(width, num_classes)

  def forward(self, x):
    x = F.max_pool2d(self.bn1(self.conv1(x)), 3, 2, 1)
    if self.block == "basic":
      for s in range(1, 5):
        x = getattr(self, f"layer{s}")(x)
    else:
      x1 = x2 = x
      for blk in self.layers:
        x1, x2 = blk(x1, x2)
      x = x2
    return self.fc(x.mean(dim=(2, 3)))


def randomize_(net: nn.Module, seed: int = 0) -> nn.Module:
  """Random latent weights (both signs) and random BN affine and running statistics."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in net.parameters():  # BN affine is overwritten below
      w = torch.randn(p.shape, generator=g) * (0.1 if p.ndim > 1 else 0.5)
      # randn does return exact zeros in a few-million draws; sign(0) is 0 in PyTorch but +1
      # here (a documented difference), so keep latent weights off zero.
      p.copy_(torch.where(w == 0, torch.full_like(w, 0.05), w))
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        m.num_batches_tracked.fill_(1234)
  return net.eval()


def official_checkpoint(net: nn.Module) -> dict:
  """What the authors' `train.py` saves: DataParallel `module.` keys inside a dict wrapper."""
  return {
      "epoch": 255,
      "state_dict": {f"module.{k}": v.clone() for k, v in net.state_dict().items()},
      "best_top1_acc": 56.4,
      "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "betas": (0.9, 0.999)}]},
  }
