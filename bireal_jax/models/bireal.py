"""Bi-Real Net models (Liu et al., ECCV 2018), exactly as the authors' PyTorch code builds them.

`BiRealNet(stage_sizes=(4, 4, 4, 4))` is Bi-Real-18 (official `BiReal18_34/birealnet.py`):
  stem conv 7×7/2 (real, no bias) → BN → max-pool 3×3/2 (no ReLU), four stages of `BiRealBlock`
  (widths 64/128/256/512, stride 2 in the first block of stages 2–4), global average pool, Dense.
`block="bottleneck"` gives Bi-Real-50/152 (official `BiReal_50/birealnet.py`).
`stem="small"` swaps the stem for conv 3×3/1 → BN without max-pool, for 28–32 px images.
`activation="hardtanh", kernel_quantizer=None` is the real-valued clip twin with the *same*
parameter tree, used for the paper's two-step training.
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bireal_jax import layers
from bireal_jax.models import plan
from bireal_jax.layers import (BiRealBlock, BiRealBottleneck, Downsample, QuantizerSpec,
                               torch_default_init)

STEMS = ("imagenet", "small")
SHORTCUTS = ("bireal", "resnet", "none")
PADDINGS = ("torch", "same")


def check_options(*, stage_sizes, block, num_classes, base_width, stem, shortcut, padding,
                  bn_momentum, bn_epsilon) -> None:
  """Raise ValueError naming the option, its value and what was expected, before any tracing
  (an impossible size would otherwise fail deep inside XLA)."""
  def whole(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)

  if block not in ("basic", "bottleneck"):
    raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
  if stem not in STEMS:
    raise ValueError(f"stem must be {' or '.join(map(repr, STEMS))}, got {stem!r}")
  if padding not in PADDINGS:
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
  if shortcut not in SHORTCUTS:
    raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
  if shortcut != "bireal" and block != "basic":
    raise ValueError(f"shortcut={shortcut!r} is only defined for block='basic'")
  if not whole(num_classes) or num_classes < 1:
    raise ValueError(f"num_classes={num_classes!r} is invalid: expected a positive integer")
  if not whole(base_width) or base_width < 1:
    raise ValueError(f"base_width={base_width!r} is invalid: expected a positive integer")
  if (not isinstance(stage_sizes, (tuple, list)) or not stage_sizes
      or not all(whole(n) and n >= 1 for n in stage_sizes)):
    raise ValueError(f"stage_sizes={stage_sizes!r} is invalid: expected a non-empty sequence of "
                     f"positive integers, e.g. (2, 2, 2, 2)")
  if not 0.0 <= bn_momentum <= 1.0:
    raise ValueError(f"bn_momentum={bn_momentum!r} is invalid: expected a decay in [0, 1]")
  if not bn_epsilon > 0:
    raise ValueError(f"bn_epsilon={bn_epsilon!r} is invalid: expected a positive number")


class BiRealNet(nn.Module):
  """Bi-Real Net. Inputs NHWC float images, outputs float32 logits `[batch, num_classes]`.

  Attributes:
    stage_sizes: blocks per stage; for `block="basic"` each block is one binary 3×3 conv.
    block: "basic" (Bi-Real-18/34) or "bottleneck" (Bi-Real-50/152).
    num_classes: classifier width.
    base_width: stem width (64 in the paper); stage widths double from it.
    stem: "imagenet" (7×7/2 + max-pool) or "small" (3×3/1, no pool) for 28–32 px inputs.
    activation: input quantizer of every binary conv ("approx_sign", "ste_sign", "hardtanh", ...).
    kernel_quantizer: weight quantizer ("magnitude_aware", "official", "sign", None).
    binary_kernel_init: init of binary kernels ("official" = U[0, 1e-3) as the authors' code).
    shortcut: "bireal" (around every binary conv), "resnet" (every two convs), "none".
    dtype: compute dtype (e.g. bfloat16); parameters stay in `param_dtype`.
    bn_momentum, bn_epsilon: BatchNorm decay and epsilon (PyTorch momentum 0.1 == decay 0.9).
    padding: "torch" (official: stem conv pad 3, max-pool pad 1, 3×3 convs pad 1 on every side) or
      "same" (TF/Keras 'same', as larq-zoo: with stride 2 on even sizes it pads only after, so
      larq-zoo weights need it for identical outputs).
    axis_name: mapped axis over which BatchNorm averages statistics (cross-replica BN).
  """

  stage_sizes: Sequence[int]
  block: str = "basic"
  num_classes: int = 1000
  base_width: int = 64
  stem: str = "imagenet"
  activation: QuantizerSpec = "approx_sign"
  kernel_quantizer: QuantizerSpec = "magnitude_aware"
  binary_kernel_init: str = "official"
  shortcut: str = "bireal"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: Optional[str] = None
  padding: str = "torch"

  def __post_init__(self):
    check_options(stage_sizes=self.stage_sizes, block=self.block, num_classes=self.num_classes,
                  base_width=self.base_width, stem=self.stem, shortcut=self.shortcut,
                  padding=self.padding, bn_momentum=self.bn_momentum,
                  bn_epsilon=self.bn_epsilon)
    super().__post_init__()

  def _check(self, x):
    if x.ndim != 4:
      raise ValueError(f"BiRealNet expects NHWC images of rank 4, got shape {tuple(x.shape)}")
    if self.has_variable("params", "conv1"):
      kernel = self.get_variable("params", "conv1")["kernel"]
      if kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"input has {x.shape[-1]} channels but the parameters expect "
                         f"{kernel.shape[2]} (conv1 kernel {tuple(kernel.shape)})")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    self._check(x)
    norm = functools.partial(layers.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             axis_name=self.axis_name)
    x = x.astype(self.dtype)
    same = self.padding == "same"
    if self.stem == "imagenet":
      x = nn.Conv(self.base_width, (7, 7), (2, 2), padding="SAME" if same else [(3, 3), (3, 3)],
                  use_bias=False, dtype=self.dtype, kernel_init=torch_default_init,
                  conv_general_dilated=layers.conv_general_dilated,
                  name="conv1")(x)
      x = norm(name="bn1")(x)
      # nn.max_pool's values and gradients; on CPU computed without reduce_window (faster).
      x = layers.max_pool(x, (3, 3), (2, 2), padding="SAME" if same else ((1, 1), (1, 1)))
    else:
      x = nn.Conv(self.base_width, (3, 3), (1, 1), padding="SAME" if same else [(1, 1), (1, 1)],
                  use_bias=False, dtype=self.dtype, kernel_init=torch_default_init,
                  conv_general_dilated=layers.conv_general_dilated,
                  name="conv1")(x)
      x = norm(name="bn1")(x)

    common = dict(activation=self.activation, kernel_quantizer=self.kernel_quantizer,
                  kernel_init=self.binary_kernel_init, norm=norm, dtype=self.dtype,
                  padding="SAME" if same else 1)
    if self.block == "basic":
      x = self._basic_stages(x, norm, common)
    else:
      x = self._bottleneck_stages(x, common)

    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_default_init,
                 bias_init=torch_bias_init(x.shape[-1]), name="fc")(x)
    return x.astype(jnp.float32)

  def _basic_stages(self, x, norm, common):
    for u in plan.basic_plan(self.stage_sizes, self.base_width, self.shortcut):
      if u.kind == "bireal":  # the block adds its own (possibly downsampling) shortcut
        x = BiRealBlock(u.width, u.stride, **common, name=u.names[0])(x)
      elif u.kind == "pair":  # plain 1-bit ResNet: one shortcut around two convs
        inp = x
        x = BiRealBlock(u.width, u.stride, shortcut=False, **common, name=u.names[0])(x)
        x = BiRealBlock(u.width, 1, shortcut=False, **common, name=u.names[1])(x)
        if u.downsample:
          inp = Downsample(u.width, u.stride, norm, self.dtype, name=u.downsample_name)(inp)
        x = x + inp.astype(x.dtype)
      else:  # no shortcut at all
        x = BiRealBlock(u.width, u.stride, shortcut=False, **common, name=u.names[0])(x)
    return x

  def _bottleneck_stages(self, x, common):
    x1 = x2 = x
    for u in plan.bottleneck_plan(self.stage_sizes, self.base_width):
      x1, x2 = BiRealBottleneck(u.width, u.stride, is_downsample=u.is_downsample,
                                is_first_block=u.is_first, **common, name=u.name)(x1, x2)
    return x2


def torch_bias_init(fan_in: int):
  bound = 1.0 / fan_in**0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
