"""The stage plan: which units a Bi-Real net has, with their names, widths, strides and
shortcuts. The Linen model (`bireal.BiRealNet`) and the packed forward (`bireal_jax.deploy`) both
walk this one list, so a change of wiring is made once.

Basic nets (Bi-Real-18/34): stage `s` has width `base_width·2^s`; its first unit has stride 2
(except in stage 0). A unit is one of
  * "bireal" — one binary 3×3 conv with its own shortcut (`BiRealBlock`, the paper's §3.1);
  * "pair"   — two binary convs under one shortcut (the plain 1-bit ResNet ablation);
  * "plain"  — one binary conv, no shortcut.
`downsample` says the shortcut changes shape (avg-pool + real 1×1 conv + BN).
Bottleneck nets (Bi-Real-50/152): stage `s` has width `4·base_width·2^s`, one `BiRealBottleneck`
per block, named `layers_{k}` in order.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class BasicUnit:
  kind: str  # "bireal" | "pair" | "plain"
  names: tuple  # module names of its convolution blocks
  width: int
  stride: int
  downsample: bool

  @property
  def downsample_name(self) -> str:
    """The shortcut's module: inside the block for "bireal", beside it for "pair"."""
    return "downsample" if self.kind == "bireal" else f"{self.names[0]}_downsample"


@dataclasses.dataclass(frozen=True)
class BottleneckUnit:
  name: str
  width: int  # output width (4 × the mid width)
  stride: int
  is_downsample: bool
  is_first: bool


def basic_plan(stage_sizes: Sequence[int], base_width: int, shortcut: str) -> list[BasicUnit]:
  units, in_width = [], base_width
  for s, n in enumerate(stage_sizes):
    width = base_width * 2**s
    i = 0
    while i < n:
      stride = 2 if (s > 0 and i == 0) else 1
      name = f"layer{s + 1}_{i}"
      reshape = stride != 1 or in_width != width
      if shortcut == "bireal" or (shortcut == "resnet" and i == n - 1 and n % 2):
        units.append(BasicUnit("bireal", (name,), width, stride, reshape))
        i += 1
      elif shortcut == "resnet":
        units.append(BasicUnit("pair", (name, f"layer{s + 1}_{i + 1}"), width, stride, reshape))
        i += 2
      else:
        units.append(BasicUnit("plain", (name,), width, stride, False))
        i += 1
      in_width = width
  return units


def bottleneck_plan(stage_sizes: Sequence[int], base_width: int) -> list[BottleneckUnit]:
  units = []
  for s, n in enumerate(stage_sizes):
    for i in range(n):
      units.append(BottleneckUnit(f"layers_{len(units)}", base_width * 4 * 2**s,
                                  2 if (s > 0 and i == 0) else 1, i == 0, not units))
  return units
