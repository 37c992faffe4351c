"""Binary layers: `BinaryConv` and Bi-Real Net's building blocks (Flax Linen).

Where the paper's techniques live:
  * Bi-Real shortcut (paper §3.1) ............ `BiRealBlock` (and the two-stream `BiRealBottleneck`)
  * ApproxSign (§3.2) ......................... `quantizers.approx_sign`, the blocks' `activation`
  * Magnitude-aware weights (§3.3) ........... `quantizers.magnitude_aware_sign`, `BinaryConv`
  * Clip pre-training (§3.4) ................. the same blocks with `activation="hardtanh"` and
    `kernel_quantizer=None`: identical parameter trees, so a real-valued checkpoint loads 1:1.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bireal_jax import ops, quantizers

Dtype = Any
QuantizerSpec = Union[str, Callable, None]
PaddingLike = Union[str, int, Sequence[Union[int, Tuple[int, int]]]]

# PyTorch's default conv/linear init (kaiming_uniform with a=sqrt(5)) == U(±1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3, "fan_in", "uniform")


def official_binary_init(key, shape, dtype=jnp.float32):
  """The authors' `HardBinaryConv` init: `torch.rand(shape) * 0.001`, i.e. U[0, 1e-3)."""
  return jax.random.uniform(key, shape, dtype, 0.0, 1e-3)


KERNEL_INITS: dict[str, Callable] = {
    "official": official_binary_init,
    "torch_default": torch_default_init,
    "lecun_normal": nn.initializers.lecun_normal(),
    "glorot_normal": nn.initializers.glorot_normal(),
    "he_normal": nn.initializers.he_normal(),
}


def get_init(name: Union[str, Callable]) -> Callable:
  if callable(name):
    return name
  if name not in KERNEL_INITS:
    raise ValueError(f"unknown kernel init {name!r}; expected one of {sorted(KERNEL_INITS)}")
  return KERNEL_INITS[name]


def pairs(v, n: int, what: str) -> Tuple[int, ...]:
  t = (v,) * n if isinstance(v, int) else tuple(v)
  if len(t) != n or any((not isinstance(i, int)) or i < 1 for i in t):
    raise ValueError(f"{what} must be a positive int or {n} positive ints, got {v!r}")
  return t


def normalize_padding(padding: PaddingLike, n: int):
  """'SAME'/'VALID' (any case), or `n` (low, high) pairs from an int, ints or pairs."""
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
    return padding.upper()
  if isinstance(padding, int):
    return [(padding, padding)] * n
  pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  if len(pads) != n:
    raise ValueError(f"padding needs {n} entries, got {padding!r}")
  return pads


def max_pool(x: jax.Array, window: Sequence[int] = (3, 3), strides: Sequence[int] = (2, 2),
             padding: Union[str, Sequence[Tuple[int, int]]] = ((1, 1), (1, 1))) -> jax.Array:
  """NHWC max-pool with `nn.max_pool`'s values and gradient (`ops.max_pool`): padding is −inf and
  the gradient of each window goes to its first maximum in row-major order, so ties behave
  exactly as with `nn.max_pool`."""
  window, strides = tuple(window), tuple(strides)
  if x.ndim != 4 or len(window) != 2 or len(strides) != 2:
    raise ValueError(f"max_pool expects NHWC inputs and 2-D window/strides, got {x.shape}, "
                     f"{window}, {strides}")
  return ops.max_pool(x, window, strides, ops.explicit_pads(padding, x.shape, window, strides))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` that sends plain 2-D NHWC/HWIO convolutions to `ops.conv2d`.

  Pass it to `nn.Conv(conv_general_dilated=...)`; anything else goes to `lax` unchanged.
  """
  plain = (lhs.ndim == 4 and rhs.ndim == 4 and feature_group_count == 1
           and batch_group_count == 1 and preferred_element_type is None and precision is None
           and all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
           and dimension_numbers == lax.conv_dimension_numbers(
               lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
  if plain:
    strides = tuple(window_strides)
    return ops.conv2d(lhs, rhs, strides,
                      ops.explicit_pads(padding, lhs.shape, rhs.shape[:2], strides))
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, batch_group_count,
                                  precision, preferred_element_type)


def binary_conv(x: jax.Array, w: jax.Array, strides: Sequence[int], pads, input_quantizer,
                kernel_quantizer) -> jax.Array:
  """`conv(x, w)` of already quantized operands: `ops.binary_conv2d` (exact sums) when the
  quantizers' tags promise ±1 inputs and an α·sign kernel in f32, else `ops.conv2d`."""
  if (quantizers.output_kind(input_quantizer) == quantizers.PM1
      and quantizers.output_kind(kernel_quantizer) == quantizers.ALPHA_SIGN
      and x.dtype == jnp.float32 and w.dtype == jnp.float32):
    return ops.binary_conv2d(x, w, strides, pads)
  return ops.conv2d(x, w, strides, pads)


def quantized_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], pads,
                   input_quantizer: QuantizerSpec, kernel_quantizer: QuantizerSpec,
                   dtype) -> jax.Array:
  """`BinaryConv`'s computation on its latent kernel (Linen and NNX alike): quantize the input
  (before zero padding, as the authors' code) and the kernel (in the parameter dtype, so α is
  f32), then `binary_conv` in `dtype`."""
  in_q, k_q = quantizers.get(input_quantizer), quantizers.get(kernel_quantizer)
  x = x.astype(dtype)
  if in_q is not None:
    x = in_q(x)
  w = (k_q(kernel) if k_q is not None else kernel).astype(dtype)
  return binary_conv(x, w, strides, pads, in_q, k_q)


class BinaryConv(nn.Module):
  """Convolution with quantized inputs and kernel (HWIO kernel, NHWC inputs), like `nn.Conv`.

  `input_quantizer` is applied to the input *before* zero padding (as the authors' PyTorch code
  does), `kernel_quantizer` to the latent kernel. Either may be a registered name, a callable, or
  `None` for real-valued. With both `None` this is a plain bias-free convolution with the same
  parameter tree, which is what the real-valued twin of a binary net uses.
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Union[int, Sequence[int]] = 1
  padding: PaddingLike = "SAME"
  input_quantizer: QuantizerSpec = "approx_sign"
  kernel_quantizer: QuantizerSpec = "magnitude_aware"
  use_bias: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Union[str, Callable] = "official"
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ks = pairs(tuple(self.kernel_size), 2, "kernel_size")
    strides = pairs(self.strides, 2, "strides")
    if x.ndim != 4:
      raise ValueError(f"BinaryConv expects NHWC inputs of rank 4, got shape {x.shape}")
    in_features = x.shape[-1]
    # Checked before `self.param`, whose own shape error does not say which input was wrong.
    if self.has_variable("params", "kernel"):
      existing = self.get_variable("params", "kernel")
      if existing.shape[2] != in_features:
        raise ValueError(f"input has {in_features} channels but kernel {tuple(existing.shape)} "
                         f"expects {existing.shape[2]}")
    kernel = self.param("kernel", get_init(self.kernel_init), (*ks, in_features, self.features),
                        self.param_dtype)
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    pads = ops.explicit_pads(normalize_padding(self.padding, 2), x.shape, ks, strides)
    y = quantized_conv(x, kernel, strides, pads, self.input_quantizer, self.kernel_quantizer,
                       dtype)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
    return y


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` (same options, variables and values) whose training-mode normalisation over
  all axes but the last goes through `ops.batch_norm_train` (flax's formula; on the CPU possibly
  a faster twin). Every other case (eval, init, masks, other axes or dtypes) is `nn.BatchNorm`
  itself.
  """

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    fast = (not use_ra and not self.is_initializing() and mask is None
            and self.axis in (-1, (-1,), x.ndim - 1) and self.axis_index_groups is None
            and self.use_fast_variance and self.use_scale and self.use_bias
            and self.force_float32_reductions and x.dtype == jnp.float32
            and self.param_dtype == jnp.float32 and self.dtype in (None, jnp.float32))
    if not fast:
      return super().__call__(x, use_running_average, mask=mask)
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
    y, mu, var = ops.batch_norm_train(x, scale, bias, self.epsilon, self.axis_name)
    mu, var = lax.stop_gradient(mu), lax.stop_gradient(var)
    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mu
    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


def avg_pool(x: jax.Array, s: int) -> jax.Array:
  """s×s average pool, stride s. On even sizes this is PyTorch's `AvgPool2d(s, s)`; on odd sizes
  the edge window is averaged over its valid pixels, so it matches a stride-s conv's output size."""
  # Stays a reduce_window: a strided-slice version fused worse here than reduce_window, unlike
  # the stem max-pool, and slowed the CPU train step (docs/speed.md, "Fixed choices").
  return nn.avg_pool(x, (s, s), (s, s), padding="SAME", count_include_pad=False)


class Downsample(nn.Module):
  """Real-valued shortcut for a change of shape: avg-pool (stride) → real 1×1 conv → BN."""

  features: int
  strides: int = 2
  norm: Callable = BatchNorm
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.strides > 1:
      x = avg_pool(x, self.strides)
    x = nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype,
                kernel_init=torch_default_init, conv_general_dilated=conv_general_dilated,
                name="conv")(x)
    return self.norm(name="bn")(x)


class BiRealBlock(nn.Module):
  """One Bi-Real unit (paper §3.1, official `BasicBlock`): `x → act → BinaryConv 3×3 → BN (+ x)`.

  The shortcut carries the real-valued activation around every single binary convolution. When
  the shape changes (stride 2 or new width) the shortcut is `Downsample` (avg-pool + real 1×1
  conv + BN). `shortcut=False` returns the conv branch only (used by the 1-bit ResNet and
  no-shortcut ablations, whose shortcuts the model wires itself).
  """

  features: int
  strides: int = 1
  activation: QuantizerSpec = "approx_sign"
  kernel_quantizer: QuantizerSpec = "magnitude_aware"
  kernel_init: Union[str, Callable] = "official"
  norm: Callable = BatchNorm
  shortcut: bool = True
  dtype: Optional[Dtype] = None
  padding: PaddingLike = 1  # of the 3×3 conv; "SAME" = TF/Keras 'same' (larq-zoo)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = BinaryConv(self.features, (3, 3), self.strides, padding=self.padding,
                   input_quantizer=self.activation, kernel_quantizer=self.kernel_quantizer,
                   kernel_init=self.kernel_init, dtype=self.dtype, name="binary_conv")(x)
    y = self.norm(name="bn1")(y)
    if not self.shortcut:
      return y
    if self.strides != 1 or x.shape[-1] != self.features:
      x = Downsample(self.features, self.strides, self.norm, self.dtype, name="downsample")(x)
    return y + x.astype(y.dtype)


class BiRealBottleneck(nn.Module):
  """Official Bi-Real-50/152 bottleneck: three convs (1×1, 3×3, 1×1), each with its own shortcut.

  It carries two streams, as the authors' `BiReal_50/birealnet.py` does: `x1` (the mid-width
  stream, shortcut of the first 1×1 conv) and `x2` (the full-width stream). Returns the new
  `(x1, x2)`. In the very first block the first 1×1 conv is real-valued with `leaky_clip`
  activation and no shortcut; downsampling blocks use avg-pool + real 1×1 conv + BN on the outer
  shortcut, a real 1×1 conv (no BN) on the mid stream, and avg-pool on the middle shortcut.
  """

  features: int  # output width (4 × mid width)
  strides: int = 1
  is_downsample: bool = False
  is_first_block: bool = False
  activation: QuantizerSpec = "approx_sign"
  kernel_quantizer: QuantizerSpec = "magnitude_aware"
  kernel_init: Union[str, Callable] = "official"
  norm: Callable = BatchNorm
  dtype: Optional[Dtype] = None
  padding: PaddingLike = 1  # of the 3×3 conv (1×1 convs need none); "SAME" = TF/Keras 'same'

  @nn.compact
  def __call__(self, x1: jax.Array, x2: jax.Array) -> Tuple[jax.Array, jax.Array]:
    mid = self.features // 4
    conv = lambda f, k, s, aq, kq, name: BinaryConv(  # noqa: E731
        f, (k, k), s, padding=self.padding if k == 3 else 0, input_quantizer=aq,
        kernel_quantizer=kq,
        kernel_init=self.kernel_init if kq is not None else torch_default_init,
        dtype=self.dtype, name=name)
    if self.is_first_block:
      out1 = conv(mid, 1, 1, "leaky_clip", None, "conv1")(x2)
    else:
      out1 = conv(mid, 1, 1, self.activation, self.kernel_quantizer, "conv1")(x2)
    out1 = self.norm(name="bn1")(out1)
    if not self.is_first_block:
      if self.is_downsample:
        x1 = nn.Conv(mid, (1, 1), use_bias=False, dtype=self.dtype,
                     kernel_init=torch_default_init,
                     conv_general_dilated=conv_general_dilated, name="down_conv1x1")(x1)
      out1 = out1 + x1.astype(out1.dtype)

    out2 = conv(mid, 3, self.strides, self.activation, self.kernel_quantizer, "conv2")(out1)
    out2 = self.norm(name="bn2")(out2)
    mid_sc = out1
    if self.is_downsample and self.strides == 2:
      mid_sc = avg_pool(out1, 2)
    out2 = out2 + mid_sc

    out3 = conv(self.features, 1, 1, self.activation, self.kernel_quantizer, "conv3")(out2)
    out3 = self.norm(name="bn3")(out3)
    outer = x2
    if self.is_downsample:
      outer = Downsample(self.features, self.strides, self.norm, self.dtype, name="downsample")(x2)
    return out2, out3 + outer.astype(out3.dtype)
