"""Bi-Real layers as Flax NNX modules, twins of the Linen layers in `bireal_jax.layers`.

Each module computes through the very functions the Linen one runs (`quantizers.get`,
`layers.binary_conv`, `ops.conv2d`, `ops.batch_norm_train`, `layers.avg_pool`) and holds the same
variables under the same attribute names, so `nnx.state(module, nnx.Param)` is the Linen
`params` tree and `nnx.state(module, nnx.BatchStat)` the Linen `batch_stats` tree.

NNX builds eagerly, so every module takes its input width (`in_features`) up front, and the
random generators as `rngs=` (only `rngs.params()` is used). BatchNorm follows the NNX mode
convention: `use_running_average=False` (training) by default; `model.eval()` / `model.train()`
or `nnx.view(model, use_running_average=...)` switch it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from bireal_jax import layers as _linen_layers
from bireal_jax import ops, quantizers
from bireal_jax.layers import PaddingLike, QuantizerSpec, get_init, torch_default_init

Dtype = Any


def _promote(dtype, *arrays):
  """`flax` dtype promotion as `nn.Conv` / `nn.Dense` do it: everything to `dtype`, or to the
  operands' result type when `dtype` is None."""
  dtype = dtype or jnp.result_type(*arrays)
  return tuple(jnp.asarray(a, dtype) for a in arrays)


class BinaryConv(nnx.Module):
  """Convolution with quantized input and kernel (NHWC inputs, HWIO kernel): `layers.BinaryConv`.

  `input_quantizer` is applied before the zero padding, `kernel_quantizer` to the latent kernel
  (in the parameter dtype), then `layers.binary_conv` runs `ops.binary_conv2d` (exact ±1 sums) or
  `ops.conv2d`. Variables: `kernel` (and `bias` with `use_bias`).
  """

  def __init__(self, in_features: int, features: int, kernel_size: Sequence[int] = (3, 3),
               strides: Union[int, Sequence[int]] = 1, padding: PaddingLike = "SAME", *,
               input_quantizer: QuantizerSpec = "approx_sign",
               kernel_quantizer: QuantizerSpec = "magnitude_aware", use_bias: bool = False,
               dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
               kernel_init: Union[str, Callable] = "official",
               bias_init: Callable = jax.nn.initializers.zeros, rngs: nnx.Rngs):
    self.kernel_size = _linen_layers.pairs(tuple(kernel_size), 2, "kernel_size")
    self.strides = _linen_layers.pairs(strides, 2, "strides")
    self.padding = _linen_layers.normalize_padding(padding, 2)
    self.in_features, self.features = int(in_features), int(features)
    self.input_quantizer, self.kernel_quantizer = input_quantizer, kernel_quantizer
    for q in (input_quantizer, kernel_quantizer):
      quantizers.get(q)  # unknown names fail here rather than at the first call
    self.use_bias, self.dtype, self.param_dtype = use_bias, dtype, param_dtype
    self.kernel = nnx.Param(get_init(kernel_init)(
        rngs.params(), (*self.kernel_size, self.in_features, self.features), param_dtype))
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), (self.features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"BinaryConv expects NHWC inputs of rank 4, got shape {x.shape}")
    kernel = self.kernel[...]
    if x.shape[-1] != kernel.shape[2]:
      raise ValueError(f"input has {x.shape[-1]} channels but kernel {tuple(kernel.shape)} "
                       f"expects {kernel.shape[2]}")
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    pads = ops.explicit_pads(self.padding, x.shape, self.kernel_size, self.strides)
    y = _linen_layers.quantized_conv(x, kernel, self.strides, pads, self.input_quantizer,
                                     self.kernel_quantizer, dtype)
    if self.use_bias:
      y = y + self.bias[...].astype(dtype)
    return y


class Conv(nnx.Module):
  """Real bias-free 2-D convolution through `ops.conv2d`: what `nn.Conv(...,
  conv_general_dilated=layers.conv_general_dilated)` computes in the Linen models (same dtype
  promotion, same explicit padding). Variable: `kernel` (HWIO).

  (An adapter: `nnx.Conv` passes `out_sharding=` to its `conv_general_dilated`, which
  `layers.conv_general_dilated` does not take.)
  """

  def __init__(self, in_features: int, features: int, kernel_size: Sequence[int] = (1, 1),
               strides: Union[int, Sequence[int]] = 1, padding: PaddingLike = "SAME", *,
               dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
               kernel_init: Callable = torch_default_init, rngs: nnx.Rngs):
    self.kernel_size = _linen_layers.pairs(tuple(kernel_size), 2, "kernel_size")
    self.strides = _linen_layers.pairs(strides, 2, "strides")
    self.padding = _linen_layers.normalize_padding(padding, 2)
    self.in_features, self.features = int(in_features), int(features)
    self.dtype, self.param_dtype = dtype, param_dtype
    self.kernel = nnx.Param(get_init(kernel_init)(
        rngs.params(), (*self.kernel_size, self.in_features, self.features), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x, w = _promote(self.dtype, x, self.kernel[...])
    pads = ops.explicit_pads(self.padding, x.shape, self.kernel_size, self.strides)
    return ops.conv2d(x, w, self.strides, pads)


def batch_statistics(x: jax.Array, *, dtype: Optional[Dtype] = None,
                     axis_name: Optional[str] = None) -> tuple[jax.Array, jax.Array]:
  """Per-channel batch mean and variance over every axis but the last, as `nn.BatchNorm`.

  In at least float32 (`dtype` or x's, promoted): half-precision sums would lose the small
  variances. Var = max(0, E[x²] − E[x]²) (one pass; the clip stops round-off from going
  negative). With `axis_name`, E[x] and E[x²] are averaged over that mapped axis in one
  `lax.pmean`, so every device normalises with the global batch's statistics.
  """
  x = x.astype(jnp.promote_types(dtype or x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  moments = jnp.stack([x.mean(axes), lax.square(x).mean(axes)])
  if axis_name is not None:
    moments = lax.pmean(moments, axis_name)
  mu, mu2 = moments[0], moments[1]
  return mu, jnp.maximum(0.0, mu2 - lax.square(mu))


class BatchNorm(nnx.Module):
  """BatchNorm over every axis but the last, with `layers.BatchNorm`'s values and variables.

  Training (`use_running_average=False`): float32 inputs and parameters go through
  `ops.batch_norm_train` (as the Linen layer's fast path); other dtypes through
  `batch_statistics`, the statistics `nn.BatchNorm` computes. The running statistics move as
  `momentum·old + (1 − momentum)·batch`. Eval: `(x − mean)·(rsqrt(var + ε)·scale) + bias`.
  Variables: `scale`, `bias` (`nnx.Param`), `mean`, `var` (`nnx.BatchStat`, float32).
  `axis_name` averages the batch statistics over a mapped axis (pmap / shard_map).
  """

  def __init__(self, num_features: int, *, use_running_average: bool = False,
               momentum: float = 0.99, epsilon: float = 1e-5, dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32, axis_name: Optional[str] = None,
               rngs: nnx.Rngs):
    c = (int(num_features),)
    self.num_features = int(num_features)
    self.use_running_average = use_running_average
    self.momentum, self.epsilon = momentum, epsilon
    self.dtype, self.param_dtype, self.axis_name = dtype, param_dtype, axis_name
    self.mean = nnx.BatchStat(jnp.zeros(c, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(c, jnp.float32))
    self.scale = nnx.Param(jax.nn.initializers.ones(rngs.params(), c, param_dtype))
    self.bias = nnx.Param(jax.nn.initializers.zeros(rngs.params(), c, param_dtype))

  def set_view(self, use_running_average: Optional[bool] = None):
    """Used by `nnx.view(model, use_running_average=...)`."""
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def _normalize(self, x, mean, var, scale, bias):
    # flax.linen.normalization._normalize, with the statistics broadcast over N, H, W.
    y = (x - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
    return jnp.asarray(y, self.dtype or jnp.result_type(x, scale, bias))

  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None) -> jax.Array:
    use_ra = self.use_running_average if use_running_average is None else use_running_average
    if x.shape[-1] != self.num_features:
      raise ValueError(f"BatchNorm of {self.num_features} features got an input of shape "
                       f"{tuple(x.shape)}")
    scale, bias = self.scale[...], self.bias[...]
    if use_ra:
      return self._normalize(x, self.mean[...], self.var[...], scale, bias)
    fast = (x.dtype == jnp.float32 and self.param_dtype == jnp.float32
            and self.dtype in (None, jnp.float32))
    if fast:
      y, mu, var = ops.batch_norm_train(x, scale, bias, self.epsilon, self.axis_name)
    else:
      mu, var = batch_statistics(x, dtype=self.dtype, axis_name=self.axis_name)
      y = self._normalize(x, mu, var, scale, bias)
    mu, var = lax.stop_gradient(mu), lax.stop_gradient(var)
    self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mu
    self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
    return y


def _norm_factory(norm: Optional[Callable]) -> Callable:
  """`norm(num_features, rngs=...)` -> BatchNorm; None means `BatchNorm` with defaults."""
  return norm if norm is not None else BatchNorm


class Downsample(nnx.Module):
  """Real shortcut for a change of shape: avg-pool (stride) → real 1×1 `conv` → `bn`."""

  def __init__(self, in_features: int, features: int, strides: int = 2, *,
               norm: Optional[Callable] = None, dtype: Optional[Dtype] = None,
               rngs: nnx.Rngs):
    self.strides = int(strides)
    self.conv = Conv(in_features, features, (1, 1), 1, "SAME", dtype=dtype, rngs=rngs)
    self.bn = _norm_factory(norm)(features, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.strides > 1:
      x = _linen_layers.avg_pool(x, self.strides)
    return self.bn(self.conv(x))


class BiRealBlock(nnx.Module):
  """One Bi-Real unit: `x → act → BinaryConv 3×3 → BN (+ x)`, `layers.BiRealBlock`'s twin.

  Variables: `binary_conv`, `bn1`, and `downsample` when the shape changes (stride or width).
  `shortcut=False` returns the conv branch only.
  """

  def __init__(self, in_features: int, features: int, strides: int = 1, *,
               activation: QuantizerSpec = "approx_sign",
               kernel_quantizer: QuantizerSpec = "magnitude_aware",
               kernel_init: Union[str, Callable] = "official", norm: Optional[Callable] = None,
               shortcut: bool = True, dtype: Optional[Dtype] = None, padding: PaddingLike = 1,
               rngs: nnx.Rngs):
    norm = _norm_factory(norm)
    self.shortcut = shortcut
    self.binary_conv = BinaryConv(in_features, features, (3, 3), strides, padding,
                                  input_quantizer=activation, kernel_quantizer=kernel_quantizer,
                                  kernel_init=kernel_init, dtype=dtype, rngs=rngs)
    self.bn1 = norm(features, rngs=rngs)
    self.has_downsample = shortcut and (strides != 1 or in_features != features)
    if self.has_downsample:
      self.downsample = Downsample(in_features, features, strides, norm=norm, dtype=dtype,
                                   rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.bn1(self.binary_conv(x))
    if not self.shortcut:
      return y
    if self.has_downsample:
      x = self.downsample(x)
    return y + x.astype(y.dtype)


class BiRealBottleneck(nnx.Module):
  """Official Bi-Real-50/152 bottleneck (1×1, 3×3, 1×1, each with a shortcut), two streams:
  `__call__(x1, x2) -> (x1, x2)` as `layers.BiRealBottleneck`.

  `in_features` is the width of `x2` (full stream), `mid_in_features` that of `x1` (mid stream;
  only read by downsampling blocks after the first, which own `down_conv1x1`).
  Variables: `conv1`, `bn1`, `conv2`, `bn2`, `conv3`, `bn3`, and `down_conv1x1` / `downsample`
  as in Linen.
  """

  def __init__(self, in_features: int, features: int, strides: int = 1, *,
               mid_in_features: Optional[int] = None, is_downsample: bool = False,
               is_first_block: bool = False, activation: QuantizerSpec = "approx_sign",
               kernel_quantizer: QuantizerSpec = "magnitude_aware",
               kernel_init: Union[str, Callable] = "official", norm: Optional[Callable] = None,
               dtype: Optional[Dtype] = None, padding: PaddingLike = 1, rngs: nnx.Rngs):
    norm = _norm_factory(norm)
    mid = features // 4
    self.strides, self.is_downsample, self.is_first_block = strides, is_downsample, is_first_block

    def conv(cin, cout, k, s, aq, kq):
      return BinaryConv(cin, cout, (k, k), s, padding if k == 3 else 0, input_quantizer=aq,
                        kernel_quantizer=kq,
                        kernel_init=kernel_init if kq is not None else torch_default_init,
                        dtype=dtype, rngs=rngs)

    if is_first_block:
      self.conv1 = conv(in_features, mid, 1, 1, "leaky_clip", None)
    else:
      self.conv1 = conv(in_features, mid, 1, 1, activation, kernel_quantizer)
    self.bn1 = norm(mid, rngs=rngs)
    if is_downsample and not is_first_block:
      if mid_in_features is None:
        raise ValueError("a downsampling bottleneck after the first needs mid_in_features "
                         "(the width of its x1 input)")
      self.down_conv1x1 = Conv(mid_in_features, mid, (1, 1), 1, "SAME", dtype=dtype, rngs=rngs)
    self.conv2 = conv(mid, mid, 3, strides, activation, kernel_quantizer)
    self.bn2 = norm(mid, rngs=rngs)
    self.conv3 = conv(mid, features, 1, 1, activation, kernel_quantizer)
    self.bn3 = norm(features, rngs=rngs)
    if is_downsample:
      self.downsample = Downsample(in_features, features, strides, norm=norm, dtype=dtype,
                                   rngs=rngs)

  def __call__(self, x1: jax.Array, x2: jax.Array) -> Tuple[jax.Array, jax.Array]:
    out1 = self.bn1(self.conv1(x2))
    if not self.is_first_block:
      if self.is_downsample:
        x1 = self.down_conv1x1(x1)
      out1 = out1 + x1.astype(out1.dtype)
    out2 = self.bn2(self.conv2(out1))
    mid_sc = out1
    if self.is_downsample and self.strides == 2:
      mid_sc = _linen_layers.avg_pool(out1, 2)
    out2 = out2 + mid_sc
    out3 = self.bn3(self.conv3(out2))
    outer = self.downsample(x2) if self.is_downsample else x2
    return out2, out3 + outer.astype(out3.dtype)


__all__ = ["BinaryConv", "Conv", "BatchNorm", "Downsample", "BiRealBlock", "BiRealBottleneck"]
