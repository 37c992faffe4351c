"""`BiRealNet` as a Flax NNX module: the twin of `bireal_jax.models.BiRealNet` (Linen).

Same options (every Linen field, with the same meaning and default), same computation, and the
same variable tree: `nnx.state(model, nnx.Param)` mirrors the Linen `params` (`conv1`, `bn1`,
`layer1_0/binary_conv`, ..., `layers_0/conv1`, ..., `fc`) and `nnx.state(model, nnx.BatchStat)`
the Linen `batch_stats`. The only new arguments are `in_features` (image channels; NNX creates
parameters eagerly), `use_running_average` (the starting mode) and `rngs`.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bireal_jax import layers as _linen_layers
from bireal_jax.layers import QuantizerSpec, torch_default_init
from bireal_jax.models.bireal import check_options, torch_bias_init
from bireal_jax.models import plan as model_plan
from bireal_jax.nnx.layers import BatchNorm, BiRealBlock, BiRealBottleneck, Conv, Downsample


class BiRealNet(nnx.Module):
  """Bi-Real Net (NNX). NHWC float images in, float32 logits `[batch, num_classes]` out.

  See `bireal_jax.models.BiRealNet` for the options. New models are in training mode (NNX's
  convention: BatchNorm uses and updates batch statistics); `model.eval()` switches to the running
  statistics, `model.train()` back. `rngs=None` initialises from a fixed rbg key (seed 0): on
  the CPU rbg keys initialise many times faster than threefry ones.
  """

  def __init__(self, stage_sizes: Sequence[int], block: str = "basic", num_classes: int = 1000,
               base_width: int = 64, stem: str = "imagenet",
               activation: QuantizerSpec = "approx_sign",
               kernel_quantizer: QuantizerSpec = "magnitude_aware",
               binary_kernel_init: str = "official", shortcut: str = "bireal",
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
               axis_name: Optional[str] = None, padding: str = "torch", *,
               in_features: int = 3, use_running_average: bool = False,
               rngs: Optional[nnx.Rngs] = None):
    check_options(stage_sizes=tuple(stage_sizes) if stage_sizes is not None else None,
                  block=block, num_classes=num_classes, base_width=base_width, stem=stem,
                  shortcut=shortcut, padding=padding, bn_momentum=bn_momentum,
                  bn_epsilon=bn_epsilon)
    if rngs is None:
      rngs = nnx.Rngs(params=jax.random.key(0, impl="rbg"))
    # The Linen fields, kept as static attributes (`to_linen` / `to_config` read them).
    self.stage_sizes = tuple(int(n) for n in stage_sizes)
    self.block, self.num_classes, self.base_width, self.stem = block, num_classes, base_width, stem
    self.activation, self.kernel_quantizer = activation, kernel_quantizer
    self.binary_kernel_init, self.shortcut = binary_kernel_init, shortcut
    self.dtype, self.param_dtype = dtype, param_dtype
    self.bn_momentum, self.bn_epsilon = bn_momentum, bn_epsilon
    self.axis_name, self.padding = axis_name, padding
    self.in_features = int(in_features)

    norm = functools.partial(BatchNorm, use_running_average=use_running_average,
                             momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype,
                             param_dtype=param_dtype, axis_name=axis_name)
    same = padding == "same"
    if stem == "imagenet":
      self.conv1 = Conv(in_features, base_width, (7, 7), 2, "SAME" if same else 3, dtype=dtype,
                        rngs=rngs)
    else:
      self.conv1 = Conv(in_features, base_width, (3, 3), 1, "SAME" if same else 1, dtype=dtype,
                        rngs=rngs)
    self.bn1 = norm(base_width, rngs=rngs)

    common = dict(activation=activation, kernel_quantizer=kernel_quantizer,
                  kernel_init=binary_kernel_init, norm=norm, dtype=dtype,
                  padding="SAME" if same else 1, rngs=rngs)
    # (kind, attribute name) in call order; the blocks are attributes named as in Linen.
    plan: list = []
    width = (self._basic_stages(plan, norm, common) if block == "basic"
             else self._bottleneck_stages(plan, common))
    self.fc = nnx.Linear(width, num_classes, dtype=dtype, kernel_init=torch_default_init,
                         bias_init=torch_bias_init(width), rngs=rngs)
    self._plan = tuple(plan)

  # --- construction ------------------------------------------------------------------------------

  def _add(self, plan: list, kind: str, name: str, module):
    setattr(self, name, module)
    plan.append((kind, name))

  def _basic_stages(self, plan: list, norm, common) -> int:
    """The units of `models.plan.basic_plan` (the Linen model's and the packed forward's)."""
    cin = self.base_width
    for u in model_plan.basic_plan(self.stage_sizes, self.base_width, self.shortcut):
      name = u.names[0]
      if u.kind == "bireal":
        self._add(plan, "block", name, BiRealBlock(cin, u.width, u.stride, **common))
      elif u.kind == "pair":  # one shortcut around two convs
        setattr(self, name, BiRealBlock(cin, u.width, u.stride, shortcut=False, **common))
        setattr(self, u.names[1], BiRealBlock(u.width, u.width, 1, shortcut=False, **common))
        down = None
        if u.downsample:
          down = u.downsample_name
          setattr(self, down, Downsample(cin, u.width, u.stride, norm=norm, dtype=self.dtype,
                                         rngs=common["rngs"]))
        plan.append(("pair", name, u.names[1], down))
      else:  # no shortcut at all
        self._add(plan, "block", name,
                  BiRealBlock(cin, u.width, u.stride, shortcut=False, **common))
      cin = u.width
    return cin

  def _bottleneck_stages(self, plan: list, common) -> int:
    cin = mid_in = self.base_width  # widths of x2 and x1
    for u in model_plan.bottleneck_plan(self.stage_sizes, self.base_width):
      self._add(plan, "bottleneck", u.name, BiRealBottleneck(
          cin, u.width, u.stride, mid_in_features=mid_in, is_downsample=u.is_downsample,
          is_first_block=u.is_first, **common))
      cin, mid_in = u.width, u.width // 4
    return cin

  # --- forward -----------------------------------------------------------------------------------

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"BiRealNet expects NHWC images of rank 4, got shape {tuple(x.shape)}")
    if x.shape[-1] != self.in_features:
      raise ValueError(f"input has {x.shape[-1]} channels but the parameters expect "
                       f"{self.in_features} (conv1 kernel {tuple(self.conv1.kernel.shape)})")
    x = x.astype(self.dtype)
    x = self.bn1(self.conv1(x))
    if self.stem == "imagenet":
      same = self.padding == "same"
      x = _linen_layers.max_pool(x, (3, 3), (2, 2),
                                 padding="SAME" if same else ((1, 1), (1, 1)))
    x1 = x
    for kind, name, *extra in self._plan:
      if kind == "block":
        x = getattr(self, name)(x)
      elif kind == "bottleneck":
        x1, x = getattr(self, name)(x1, x)
      else:  # "pair": plain 1-bit ResNet shortcut around two blocks
        second, down = extra
        inp = x
        x = getattr(self, second)(getattr(self, name)(x))
        if down is not None:
          inp = getattr(self, down)(inp)
        x = x + inp.astype(x.dtype)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return self.fc(x).astype(jnp.float32)
