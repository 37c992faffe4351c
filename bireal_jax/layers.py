"""Binary layers: `BinaryConv` and Bi-Real Net's building blocks (Flax Linen).

Where the paper's techniques live:
  * Bi-Real shortcut (paper §3.1) ............ `BiRealBlock` (and the two-stream `BiRealBottleneck`)
  * ApproxSign (§3.2) ......................... `quantizers.approx_sign`, the blocks' `activation`
  * Magnitude-aware weights (§3.3) ........... `quantizers.magnitude_aware_sign`, `BinaryConv`
  * Clip pre-training (§3.4) ................. the same blocks with `activation="hardtanh"` and
    `kernel_quantizer=None`: identical parameter trees, so a real-valued checkpoint loads 1:1.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bireal_jax import quantizers
from bireal_jax.ops.cpu import onednn

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


def _pairs(v, n: int, what: str) -> Tuple[int, ...]:
  t = (v,) * n if isinstance(v, int) else tuple(v)
  if len(t) != n or any((not isinstance(i, int)) or i < 1 for i in t):
    raise ValueError(f"{what} must be a positive int or {n} positive ints, got {v!r}")
  return t


def _padding(padding: PaddingLike, n: int):
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


# ---------------------------------------------------------------------------------------------
# CPU fast paths, chosen by backend at trace time so that GPU/TPU keep the plain lax ops.
#  * Max-pool: XLA:CPU lowers the gradient of a `reduce_window` max to an argmax reduce-window
#    over four s32 index arrays plus a scatter. oneDNN's pooling (`onednn.max_pool2d`) keeps a
#    one-byte argmax and reads each tensor once; without oneDNN, strided slices and an int8
#    argmax give the same values and gradients in a few fused loops.
#  * BatchNorm (training): a hand-written backward (`BatchNorm`) that never writes x − μ or x̂
#    out, which autodiff of flax's ops makes XLA do once per layer (~5 % of the Bi-Real-18 step).
#  * f32 convolutions (forward and both gradients): oneDNN's kernels through `jax.ffi` custom
#    calls (`onednn.py`) when they could be built here, ~1.4x faster than XLA's own on Bi-Real-18.
#  * Binary convolutions: ±1 inputs times ±1 kernel signs are exact integers, computed as XOR +
#    popcount on packed sign bits (the C++ `onednn.xor_conv` where built, else the pure-JAX
#    `packed.xor_popcount_conv`; for asymmetric padding, int8 dots with int32 sums where those
#    beat f32); the result is scaled by α afterwards. The backward pass is always the f32
#    convolution's transpose.
# ---------------------------------------------------------------------------------------------

_CPU_FAST_PATHS = [True]


def on_cpu() -> bool:
  """True when the CPU fast paths apply: default backend is the CPU and they are enabled."""
  return _CPU_FAST_PATHS[0] and jax.default_backend() == "cpu"


@contextlib.contextmanager
def cpu_fast_paths(enabled: bool):
  """Enable/disable the CPU fast paths for functions traced inside the block (A/B tests).

  The choice is made at trace time: an already-jitted function keeps the path it was traced with.
  """
  old = _CPU_FAST_PATHS[0]
  _CPU_FAST_PATHS[0] = bool(enabled)
  try:
    yield
  finally:
    _CPU_FAST_PATHS[0] = old


def cpu_compiler_options() -> dict:
  """XLA options that make a Bi-Real *training* step faster on CPU (`{}` on other backends).

  Pass them as `jax.jit(train_step, compiler_options=cpu_compiler_options())`, or set the
  process-wide `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` before
  JAX starts. jaxlib 0.10 sends f32 convolutions to YNNPACK, whose weight-gradient convolutions
  run at ~1/3 of the matmul rate here; without it XLA uses Eigen's convolutions (~1.6x faster
  weight gradients, the rest about equal): ~18 % less CPU per Bi-Real-18 train step. Dots and
  reductions stay on YNNPACK, so the int8 dots of the binary-conv fast path are unaffected.
  Eval-only steps are ~10 % faster *without* these options (YNNPACK's f32 forward convs win).
  """
  if jax.default_backend() != "cpu":
    return {}
  return {"xla_cpu_experimental_ynn_fusion_type":
          "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def _window_slices(xp: jax.Array, window, strides, out_hw):
  """The kh·kw strided views of padded NHWC `xp`, one per window offset, in row-major order."""
  (kh, kw), (sh, sw), (oh, ow) = window, strides, out_hw
  n, c = xp.shape[0], xp.shape[3]
  return [lax.slice(xp, (0, i, j, 0), (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]


def _pool_geometry(shape, window, strides, pads):
  hp = shape[1] + pads[0][0] + pads[0][1]
  wp = shape[2] + pads[1][0] + pads[1][1]
  out_hw = ((hp - window[0]) // strides[0] + 1, (wp - window[1]) // strides[1] + 1)
  return (hp, wp), out_hw


def _max_pool_fwd(x, window, strides, pads):
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=-jnp.inf)
  _, out_hw = _pool_geometry(x.shape, window, strides, pads)
  parts = _window_slices(xp, window, strides, out_hw)
  out = functools.reduce(jnp.maximum, parts)
  # Index of the first maximum in row-major window order: where reduce_window's gradient goes.
  idx = jnp.full(out.shape, len(parts) - 1, jnp.int8)
  for k in range(len(parts) - 2, -1, -1):
    idx = jnp.where(parts[k] == out, jnp.int8(k), idx)
  return out, idx


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_sliced(x, window, strides, pads, shape):
  return _max_pool_fwd(x, window, strides, pads)[0]


def _max_pool_sliced_fwd(x, window, strides, pads, shape):
  out, idx = _max_pool_fwd(x, window, strides, pads)
  return out, idx  # an int8 index instead of the input: 4x less to keep for the backward


def _max_pool_sliced_bwd(window, strides, pads, shape, idx, g):
  """Scatters `g` to each window's first maximum, one stride phase of the input at a time.

  Input pixel `(s·u + a, s·v + b)` is hit only by the taps `(i, j)` with `i ≡ a + pad_top` and
  `j ≡ b + pad_left` (mod the strides), each from the output `(u − δi, v − δj)`: every phase
  plane is a sum of a few shifted, masked copies of `g` at output resolution, and the planes are
  interleaved at the end (3×3/2: 1, 2, 2 and 4 terms instead of 9 strided pads per pixel).
  """
  (kh, kw), (sh, sw) = window, strides
  n, h, w, c = shape
  oh, ow = idx.shape[1:3]
  hu, wu = -(-h // sh), -(-w // sw)  # phase-plane size, cropped after interleaving
  zero = jnp.zeros((), g.dtype)
  rows = []
  for a in range(sh):
    planes = []
    for b in range(sw):
      total = jnp.zeros((n, hu, wu, c), g.dtype)
      for i in range(kh):
        di, ri = divmod(i - pads[0][0] - a, sh)
        for j in range(kw):
          dj, rj = divmod(j - pads[1][0] - b, sw)
          if ri or rj:
            continue
          part = jnp.where(idx == i * kw + j, g, zero)
          # plane[u, v] = part[u − di, v − dj], zero outside (negative padding crops).
          total = total + lax.pad(part, zero, ((0, 0, 0), (di, hu - oh - di, 0),
                                               (dj, wu - ow - dj, 0), (0, 0, 0)))
      planes.append(total)
    rows.append(jnp.stack(planes, axis=3))  # [n, hu, wu, sw, c]
  full = jnp.stack(rows, axis=2).reshape(n, hu * sh, wu * sw, c)
  return (full[:, :h, :w, :],)


_max_pool_sliced.defvjp(_max_pool_sliced_fwd, _max_pool_sliced_bwd)


def max_pool(x: jax.Array, window: Sequence[int] = (3, 3), strides: Sequence[int] = (2, 2),
             padding: Union[str, Sequence[Tuple[int, int]]] = ((1, 1), (1, 1))) -> jax.Array:
  """NHWC max-pool with `nn.max_pool`'s values and gradient, fast on CPU.

  The gradient of each window goes to its first maximum in row-major order (what XLA's
  `select_and_scatter` does), so ties behave exactly as with `nn.max_pool`. Padding is -inf.
  """
  window, strides = tuple(window), tuple(strides)
  if x.ndim != 4 or len(window) != 2 or len(strides) != 2:
    raise ValueError(f"max_pool expects NHWC inputs and 2-D window/strides, got {x.shape}, "
                     f"{window}, {strides}")
  if isinstance(padding, str):
    pads = tuple(lax.padtype_to_pads(x.shape[1:3], window, strides, padding))
  else:
    pads = tuple(tuple(p) for p in padding)
  if not on_cpu() or not jnp.issubdtype(x.dtype, jnp.floating):
    return nn.max_pool(x, window, strides, padding=pads)
  if x.dtype == jnp.float32 and onednn.active() and onednn.pool_fits(window, pads):
    return onednn.max_pool2d(x, window, strides, pads)
  return _max_pool_sliced(x, window, strides, pads, tuple(x.shape))


# Binary activations whose forward output is exactly ±1, and weight quantizers whose output is
# exactly α·sign(W) with α > 0 per output channel (α = 1 for "sign"): what the XOR and int8
# paths need.
_PM1_ACTIVATIONS = (quantizers.approx_sign, quantizers.ste_sign, quantizers.identity_sign)
_ALPHA_SIGN_WEIGHTS = (quantizers.magnitude_aware_sign, quantizers.official_magnitude_sign,
                       quantizers.sign_weight)


def _use_onednn(x, w) -> bool:
  return (on_cpu() and x.dtype == jnp.float32 and w.dtype == jnp.float32
          and onednn.active())


def _conv_f32(x, w, strides, pads):
  """NHWC × HWIO convolution with explicit pads: oneDNN on the CPU when built, else XLA's."""
  if _use_onednn(x, w):
    return onednn.conv2d(x, w, strides, pads)
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` that takes the CPU fast path for plain 2-D NHWC/HWIO f32 convs.

  Pass it to `nn.Conv(conv_general_dilated=...)`; anything else goes to `lax` unchanged.
  """
  plain = (lhs.ndim == 4 and rhs.ndim == 4 and feature_group_count == 1
           and batch_group_count == 1 and preferred_element_type is None
           and all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
           and dimension_numbers == lax.conv_dimension_numbers(
               lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
  if plain and _use_onednn(lhs, rhs):
    strides = tuple(window_strides)
    pads = _explicit_pads(padding, lhs.shape, rhs.shape[:2], strides)
    return onednn.conv2d(lhs, rhs, strides, pads)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, batch_group_count,
                                  precision, preferred_element_type)


def _int8_is_faster(x_shape, w_shape, strides, pads, f32_is_onednn: bool) -> bool:
  """Measured rule (Bi-Real-18, batch 32): the int8 im2col dot beats the f32 conv for 1×1
  kernels (no im2col copy) and outputs of at most 14×14 pixels (by 5-10 % against oneDNN, 1.3x
  against XLA); at 28×28 and 56×56 copying the 9× im2col costs more than the faster dot saves
  (28×28×128: int8 29 ms, oneDNN 14 ms). Strided convs to 28×28 win only against XLA's conv."""
  _, (oh, ow) = _pool_geometry(x_shape, w_shape[:2], strides, pads)
  return (w_shape[:2] == (1, 1) or oh * ow <= 14 * 14
          or (max(strides) > 1 and not f32_is_onednn))


def _alpha(wq):
  """α per output channel of an HWIO kernel wq = α·sign(W)."""
  return jnp.max(jnp.abs(wq), axis=(0, 1, 2))


def _conv_pm1_int8(xq, wq, strides, pads):
  """`conv(xq, wq)` for xq ∈ {±1} and wq = α·sign, computed as an int8 im2col dot (exact sums)."""
  kh, kw, cin, cout = wq.shape
  alpha = _alpha(wq)
  ws = jnp.where(wq >= 0, jnp.int8(1), jnp.int8(-1)).reshape(kh * kw * cin, cout)
  x8 = xq.astype(jnp.int8)
  if (kh, kw) == (1, 1) and all(p == (0, 0) for p in pads):
    cols = x8[:, ::strides[0], ::strides[1], :]
  else:
    x8 = jnp.pad(x8, ((0, 0), pads[0], pads[1], (0, 0)))
    _, out_hw = _pool_geometry(xq.shape, (kh, kw), strides, pads)
    cols = jnp.concatenate(_window_slices(x8, (kh, kw), strides, out_hw), axis=-1)
  n, oh, ow, k = cols.shape
  y = lax.dot_general(cols.reshape(n * oh * ow, k), ws, (((1,), (0,)), ((), ())),
                      preferred_element_type=jnp.int32)
  return y.reshape(n, oh, ow, cout).astype(jnp.float32) * alpha


def _conv_pm1_xor(xq, wq, stride: int, pad: int):
  """`conv(xq, wq)` for xq ∈ {±1} and wq = α·sign, as XOR + popcount on sign bits packed 32 to a
  word (exact integer sums): the C++ kernel, else `packed.xor_popcount_conv`."""
  if onednn.active():  # the same sums by the C++ kernel, packing and all in one custom call
    return onednn.xor_conv(xq, wq, stride, pad)
  return _conv_pm1_xor_jax(xq, wq, stride, pad)


def _conv_pm1_xor_jax(xq, wq, stride: int, pad: int):
  """The pure-JAX XOR forward (`packed.xor_popcount_conv`), scaled by α; `onednn.xor_conv`'s
  values bit for bit."""
  from bireal_jax import packed  # packed imports this module
  d = packed.xor_popcount_conv(xq, packed.pack_kernel(wq), stride, pad)
  return d.astype(jnp.float32) * _alpha(wq)


def _conv_pm1(xq, wq, strides, pads):
  # Same stride and symmetric padding on both axes (Bi-Real's convs; not TF 'SAME' at stride 2):
  # the packed XOR path, 3-6x faster than int8 or oneDNN f32 at every Bi-Real-18 shape.
  if strides[0] == strides[1] and len({p for pair in pads for p in pair}) == 1:
    return _conv_pm1_xor(xq, wq, strides[0], pads[0][0])
  if _int8_is_faster(xq.shape, wq.shape, strides, pads, _use_onednn(xq, wq)):
    return _conv_pm1_int8(xq, wq, strides, pads)
  return _conv_f32(xq, wq, strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _binary_conv_cpu(xq, wq, strides, pads):
  return _conv_pm1(xq, wq, strides, pads)


def _binary_conv_cpu_fwd(xq, wq, strides, pads):
  # Same forward values as the primal (eval), so train and eval forwards agree bit for bit.
  return _conv_pm1(xq, wq, strides, pads), (xq, wq)


def _binary_conv_cpu_bwd(strides, pads, res, g):
  # Exactly the transpose autodiff takes through `lax.conv_general_dilated` in f32.
  xq, wq = res
  return jax.vjp(lambda a, b: _conv_f32(a, b, strides, pads), xq, wq)[1](g)


_binary_conv_cpu.defvjp(_binary_conv_cpu_fwd, _binary_conv_cpu_bwd)


def _explicit_pads(padding, x_shape, window, strides):
  if isinstance(padding, str):
    return tuple(tuple(p) for p in lax.padtype_to_pads(x_shape[1:3], window, strides, padding))
  return tuple(tuple(p) for p in padding)


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
    ks = _pairs(tuple(self.kernel_size), 2, "kernel_size")
    strides = _pairs(self.strides, 2, "strides")
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
    in_q = quantizers.get(self.input_quantizer)
    k_q = quantizers.get(self.kernel_quantizer)
    x = x.astype(dtype)
    if in_q is not None:
      x = in_q(x)
    # Quantize in the parameter dtype (α in f32), then compute in `dtype`.
    w = k_q(kernel) if k_q is not None else kernel
    w = w.astype(dtype)
    if (on_cpu() and in_q in _PM1_ACTIVATIONS and k_q in _ALPHA_SIGN_WEIGHTS
        and x.dtype == jnp.float32 and w.dtype == jnp.float32):
      pads = _explicit_pads(_padding(self.padding, 2), x.shape, ks, strides)
      y = _binary_conv_cpu(x, w, strides, pads)
    else:
      y = conv_general_dilated(x, w, strides, _padding(self.padding, 2),
                               dimension_numbers=lax.conv_dimension_numbers(
                                   x.shape, w.shape, ("NHWC", "HWIO", "NHWC")))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
    return y


def _bn_stats(x, axis_name):
  """Flax's fast-variance batch statistics: mean and max(0, E[x²] − E[x]²) over N, H, W."""
  axes = tuple(range(x.ndim - 1))
  mu, mu2 = jnp.mean(x, axes), jnp.mean(x * x, axes)
  if axis_name is not None:
    mu, mu2 = lax.pmean(jnp.stack([mu, mu2]), axis_name)
  return mu, jnp.maximum(0.0, mu2 - mu * mu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn_train(x, scale, bias, epsilon, axis_name):
  return _bn_train_fwd(x, scale, bias, epsilon, axis_name)[0]


def _bn_train_fwd(x, scale, bias, epsilon, axis_name):
  mu, var = _bn_stats(x, axis_name)
  inv = lax.rsqrt(var + epsilon)
  # Keeps x (alive anyway as the conv output) rather than x − μ, which autodiff would write in
  # the forward pass: one pass over the activation less per BatchNorm.
  return ((x - mu) * (inv * scale) + bias, mu, var), (x, mu, inv, scale)


def _bn_train_bwd(epsilon, axis_name, res, cts):
  """The usual closed form: dx = γ·inv·(g − mean(g) − x̂·mean(g·x̂)), means over all replicas.

  The cotangents of the returned statistics are ignored: `BatchNorm` stops their gradient (they
  only feed the running averages)."""
  x, mu, inv, scale = res
  g = cts[0]
  axes = tuple(range(x.ndim - 1))
  # Σ g·x̂ as inv·(Σ g·x − μ·Σ g): two plain reductions over the inputs XLA already has, so x̂ is
  # never written out (it would be, as the operand of the reduction).
  dbias = jnp.sum(g, axes)
  dscale = (jnp.sum(g * x, axes) - mu * dbias) * inv
  count = x.size // x.shape[-1]
  mg, mgx = dbias, dscale
  if axis_name is not None:
    mg, mgx = lax.psum(jnp.stack([mg, mgx]), axis_name)
    count = count * lax.psum(1, axis_name)
  dx = (scale * inv) * (g - mg / count - (x - mu) * (inv * mgx / count))
  return dx, dscale, dbias


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` (same options, variables and values) with a CPU fast path for training.

  On the CPU, training-mode normalisation over N, H, W of an f32 NHWC input uses a hand-written
  backward (`_bn_train`), which keeps the conv output instead of making XLA write x − μ in the
  forward pass. Every other case (eval, init, masks, other axes or dtypes, GPU/TPU) is
  `nn.BatchNorm` itself.
  """

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    fast = (on_cpu() and not use_ra and not self.is_initializing() and mask is None
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
    y, mu, var = _bn_train(x, scale, bias, self.epsilon, self.axis_name)
    mu, var = lax.stop_gradient(mu), lax.stop_gradient(var)
    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mu
    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


def _avg_pool(x: jax.Array, s: int) -> jax.Array:
  """s×s average pool, stride s. On even sizes this is PyTorch's `AvgPool2d(s, s)`; on odd sizes
  the edge window is averaged over its valid pixels, so it matches a stride-s conv's output size."""
  # A strided-slice version measured 3% slower in the CPU train step (it fuses worse than
  # reduce_window here, unlike the stem max-pool), so this one stays as it is.
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
      x = _avg_pool(x, self.strides)
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
      mid_sc = _avg_pool(out1, 2)
    out2 = out2 + mid_sc

    out3 = conv(self.features, 1, 1, self.activation, self.kernel_quantizer, "conv3")(out2)
    out3 = self.norm(name="bn3")(out3)
    outer = x2
    if self.is_downsample:
      outer = Downsample(self.features, self.strides, self.norm, self.dtype, name="downsample")(x2)
    return out2, out3 + outer.astype(out3.dtype)
