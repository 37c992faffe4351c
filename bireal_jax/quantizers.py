"""Quantizers: Bi-Real Net's ApproxSign and magnitude-aware weights, plus baselines.

Every binary quantizer is a `jax.custom_vjp`: the forward pass is the exact quantized value,
the backward pass is the surrogate gradient named in its docstring. All preserve the input dtype
(float32, bfloat16, ...), so they work under `jit`, `grad`, `vmap`, `pmap` and `jax.checkpoint`.

Value at zero: `sign(0) = +1` everywhere here (as larq does; PyTorch's `torch.sign(0)` is 0). A packed
1-bit representation has no zero, so +1 is the only choice that packs exactly.

Quantizers are registered by name (`get("approx_sign")`) so configs can pick them as strings;
`None` / `"none"` means "leave real-valued".
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

Quantizer = Callable[[jax.Array], jax.Array]


def binary_sign(x: jax.Array) -> jax.Array:
  """Forward binarisation `+1 if x >= 0 else -1` (never 0), in the dtype of `x`."""
  one = jnp.ones((), x.dtype)
  return jnp.where(x >= 0, one, -one)


# ---------------------------------------------------------------------------------------------
# Activation quantizers
# ---------------------------------------------------------------------------------------------


@jax.custom_vjp
def approx_sign(x: jax.Array) -> jax.Array:
  """Bi-Real Net's ApproxSign (paper §3.2, official `BinaryActivation`).

  Forward: `sign(x)` (±1, +1 at 0). Backward: derivative of the piecewise polynomial
  `F(x) = -1 (x<-1); 2x+x² (-1≤x<0); 2x-x² (0≤x<1); 1 (x≥1)`, i.e.

      dF/dx = 2 + 2x  on [-1, 0),   2 - 2x  on [0, 1),   0 elsewhere.
  """
  return binary_sign(x)


def _approx_sign_fwd(x):
  return binary_sign(x), x


def _approx_sign_bwd(x, g):
  grad = jnp.where(x < 0, 2 + 2 * x, 2 - 2 * x)
  grad = jnp.where((x >= -1) & (x < 1), grad, jnp.zeros_like(grad))
  return (g * grad.astype(g.dtype),)


approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


@jax.custom_vjp
def ste_sign(x: jax.Array) -> jax.Array:
  """Sign with the clipped straight-through estimator (Hubara et al., larq `ste_sign`).

  Forward: `sign(x)` (±1, +1 at 0). Backward: `1{|x| ≤ 1}`.
  """
  return binary_sign(x)


def _ste_sign_fwd(x):
  return binary_sign(x), x


def _ste_sign_bwd(x, g):
  return (jnp.where(jnp.abs(x) <= 1, g, jnp.zeros_like(g)),)


ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


@jax.custom_vjp
def identity_sign(x: jax.Array) -> jax.Array:
  """Sign with the unclipped straight-through estimator (ablation baseline).

  Forward: `sign(x)` (±1, +1 at 0). Backward: `1` everywhere (no clipping).
  """
  return binary_sign(x)


identity_sign.defvjp(lambda x: (binary_sign(x), None), lambda _, g: (g,))


def hardtanh(x: jax.Array) -> jax.Array:
  """Real-valued twin's activation: `clip(x) = max(-1, min(1, x))` (paper's clip pre-training)."""
  return jnp.clip(x, -1, 1).astype(x.dtype)


def leaky_clip(x: jax.Array) -> jax.Array:
  """Official Bi-Real-50 `Leakyclip`: `x` on [-1, 1], slope 0.1 outside (continuous at ±1)."""
  return jnp.where(x < -1, 0.1 * x - 0.9, jnp.where(x > 1, 0.1 * x + 0.9, x)).astype(x.dtype)


def relu(x: jax.Array) -> jax.Array:
  """ReLU, for the ReLU-pre-trained twin of the initialisation ablation."""
  return jax.nn.relu(x)


# ---------------------------------------------------------------------------------------------
# Weight quantizers. Kernels are HWIO (or [in, out] for dense): the output channel is the last
# axis, so α = mean |W| over every other axis.
# ---------------------------------------------------------------------------------------------


def channel_scale(w: jax.Array) -> jax.Array:
  """α = mean |W| per output channel (last axis), kept broadcastable, gradient stopped."""
  alpha = jnp.mean(jnp.abs(w.astype(jnp.float32)), axis=tuple(range(w.ndim - 1)), keepdims=True)
  return jax.lax.stop_gradient(alpha).astype(w.dtype)


@jax.custom_vjp
def magnitude_aware_sign(w: jax.Array) -> jax.Array:
  """Magnitude-aware weight binarisation, paper §3.3 / larq `magnitude_aware_sign`.

  Forward: `W_b = α·sign(W)`, `α = mean(|W|)` per output channel. Backward (α held constant):
  `dL/dW = α · dL/dW_b · 1{|W| ≤ 1}`.
  """
  return channel_scale(w) * binary_sign(w)


def _mas_fwd(w):
  alpha = channel_scale(w)
  return alpha * binary_sign(w), (w, alpha)


def _mas_bwd(res, g):
  w, alpha = res
  return (jnp.where(jnp.abs(w) <= 1, alpha * g, jnp.zeros_like(g)),)


magnitude_aware_sign.defvjp(_mas_fwd, _mas_bwd)


@jax.custom_vjp
def official_magnitude_sign(w: jax.Array) -> jax.Array:
  """Magnitude-aware binarisation as the authors' PyTorch `HardBinaryConv` trains it.

  Forward: `W_b = α·sign(W)`, `α = mean(|W|)` per output channel (detached). Backward: the
  gradient of `clamp(W, -1, 1)`, i.e. `dL/dW = dL/dW_b · 1{|W| ≤ 1}` — no α factor.
  """
  return channel_scale(w) * binary_sign(w)


def _off_fwd(w):
  return channel_scale(w) * binary_sign(w), w


def _off_bwd(w, g):
  return (jnp.where(jnp.abs(w) <= 1, g, jnp.zeros_like(g)),)


official_magnitude_sign.defvjp(_off_fwd, _off_bwd)


def sign_weight(w: jax.Array) -> jax.Array:
  """Plain `sign(W)` without α (XNOR-free baseline), clipped-STE backward `1{|W| ≤ 1}`."""
  return ste_sign(w)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Quantizer] = {
    # activations
    "approx_sign": approx_sign,
    "ste_sign": ste_sign,
    "identity_sign": identity_sign,
    "hardtanh": hardtanh,
    "clip": hardtanh,
    "leaky_clip": leaky_clip,
    "relu": relu,
    # weights
    "magnitude_aware": magnitude_aware_sign,
    "magnitude_aware_sign": magnitude_aware_sign,
    "official": official_magnitude_sign,
    "sign": sign_weight,
}

# What each quantizer outputs, as a tag on the function itself: "pm1" (exactly ±1), "alpha_sign"
# (exactly α·sign(W), α > 0 per output channel; α = 1 for "sign") or "real". The binary
# convolutions' exact kernels, packing, the optimizer's masks and the summary all read it.
PM1, ALPHA_SIGN, REAL = "pm1", "alpha_sign", "real"
_OUTPUT_ATTR = "bireal_output"

for _fn in (approx_sign, ste_sign, identity_sign):
  setattr(_fn, _OUTPUT_ATTR, PM1)
for _fn in (magnitude_aware_sign, official_magnitude_sign, sign_weight):
  setattr(_fn, _OUTPUT_ATTR, ALPHA_SIGN)


def tag(fn: Quantizer, output: str) -> Quantizer:
  """Mark a user quantizer's output kind (PM1, ALPHA_SIGN or REAL); returns `fn`."""
  if output not in (PM1, ALPHA_SIGN, REAL):
    raise ValueError(f"output kind must be {PM1!r}, {ALPHA_SIGN!r} or {REAL!r}, got {output!r}")
  setattr(fn, _OUTPUT_ATTR, output)
  return fn


def output_kind(q: Union[str, Quantizer, None]) -> str:
  """The tag of a quantizer (name, callable or None): "pm1", "alpha_sign" or "real"."""
  fn = get(q)
  return REAL if fn is None else getattr(fn, _OUTPUT_ATTR, REAL)


# Names of the registered binary quantizers (derived from the tags).
BINARY_ACTIVATIONS = frozenset(n for n, f in _REGISTRY.items()
                               if getattr(f, _OUTPUT_ATTR, REAL) == PM1)
BINARY_WEIGHTS = frozenset(n for n, f in _REGISTRY.items()
                           if getattr(f, _OUTPUT_ATTR, REAL) == ALPHA_SIGN)


def names() -> list[str]:
  """All registered quantizer names."""
  return sorted(_REGISTRY)


def get(name: Union[str, Quantizer, None]) -> Optional[Quantizer]:
  """Quantizer by name; a callable is returned as is; `None` / "none" means real-valued."""
  if name is None or callable(name):
    return name
  if not isinstance(name, str):
    raise TypeError(f"quantizer must be a name, a callable or None, got {name!r}")
  if name.lower() in ("none", "", "real"):
    return None
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown quantizer {name!r}; expected one of {names()} or None") from None


def register(name: str, fn: Quantizer) -> None:
  """Add a user quantizer under `name` (refuses to shadow an existing one)."""
  if name in _REGISTRY:
    raise ValueError(f"quantizer {name!r} is already registered")
  _REGISTRY[name] = fn


def is_binary(name: Union[str, Quantizer, None]) -> bool:
  """True when the quantizer outputs ±1 (activation) or ±α (weight)."""
  return output_kind(name) != REAL


# ---------------------------------------------------------------------------------------------
# Latent-weight clipping (larq's `weight_clip` constraint) as an optax transformation
# ---------------------------------------------------------------------------------------------


def latent_weight_clip(clip_value: float = 1.0, mask=None):
  """Optax transformation keeping latent binary weights in [-clip_value, clip_value].

  Put it last in an `optax.chain`: it rewrites `updates` so that `params + updates` is clipped.
  `mask` is a pytree of bools (or a callable on params) selecting which leaves to clip, e.g.
  `bireal_jax.optim.binary_kernel_mask`; `None` clips every leaf. The official PyTorch code does
  not clip; larq does.
  """
  import optax  # local: keeps `import bireal_jax.quantizers` light

  if clip_value <= 0:
    raise ValueError(f"clip_value must be > 0, got {clip_value!r}")

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("latent_weight_clip needs params: call update(updates, state, params)")
    new = jax.tree.map(lambda u, p: jnp.clip(p + u, -clip_value, clip_value) - p, updates, params)
    return new, state

  tx = optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
  return optax.masked(tx, mask) if mask is not None else tx
