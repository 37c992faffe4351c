"""Model summary: per-layer parameters, memory, BOPs, FLOPs and OPs, as the Bi-Real paper counts.

The figures come from tracing the model (`jax.eval_shape` of `init`, so nothing is computed or
allocated): every Linen module call is intercepted with `nn.intercept_methods`, and each module
that owns parameters becomes a row with its kernel and output shapes. Counting rules (paper §4.3):

  * a layer is *binary* when both its input and kernel quantizers are binary
    (`quantizers.is_binary`); its multiply-accumulates are BOPs, every other conv/dense MAC is a
    FLOP (BatchNorm, pooling, additions are not counted);
  * memory = 1 bit per binary weight + 32 bits per real trainable parameter (batch statistics
    excluded; the per-channel α is derived from the latent weights and not stored separately);
  * OPs = BOPs / 64 + FLOPs; 1 Mbit = 1e6 bits. MACs are per image.

    python -m bireal_jax.summary --model bireal18 --image-size 224
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bireal_jax import models, quantizers


@dataclasses.dataclass(frozen=True)
class Row:
  """One parameter-owning module of the traced model."""

  path: str  # "/"-joined module path, e.g. "layer2_0/binary_conv"
  kind: str  # module class name
  output_shape: tuple  # per call, batch included
  kernel_shape: Optional[tuple]
  binary: bool  # binary inputs and binary kernel: MACs are BOPs
  binary_params: int
  real_params: int
  bops: int
  flops: int


@dataclasses.dataclass(frozen=True)
class Summary:
  """Rows plus totals. Build with `summarize`; print with `table()`."""

  name: str
  input_shape: tuple
  rows: tuple

  @property
  def binary_params(self) -> int:
    return sum(r.binary_params for r in self.rows)

  @property
  def real_params(self) -> int:
    return sum(r.real_params for r in self.rows)

  @property
  def params(self) -> int:
    return self.binary_params + self.real_params

  @property
  def memory_bits(self) -> int:
    return self.binary_params + 32 * self.real_params

  @property
  def memory_mbit(self) -> float:
    return self.memory_bits / 1e6

  @property
  def float_memory_mbit(self) -> float:
    """Memory of the same network with every parameter in float32."""
    return 32 * self.params / 1e6

  @property
  def bops(self) -> int:
    return sum(r.bops for r in self.rows)

  @property
  def flops(self) -> int:
    return sum(r.flops for r in self.rows)

  @property
  def ops(self) -> float:
    return self.bops / 64 + self.flops

  def totals(self) -> dict[str, Any]:
    return dict(binary_params=self.binary_params, real_params=self.real_params,
                params=self.params, memory_mbit=self.memory_mbit, bops=self.bops,
                flops=self.flops, ops=self.ops)

  def table(self, layers: bool = True) -> str:
    """The per-layer table (unless `layers=False`) followed by the totals."""
    out = [f"{self.name}  input {_shape(self.input_shape)}"]
    if layers:
      head = ("layer", "type", "output", "kernel", "bin", "binary params", "real params", "BOPs",
              "FLOPs")
      body = [(r.path, r.kind, _shape(r.output_shape[1:]),
               _shape(r.kernel_shape) if r.kernel_shape else "-", "yes" if r.binary else "",
               f"{r.binary_params:,}", f"{r.real_params:,}", f"{r.bops:,}", f"{r.flops:,}")
              for r in self.rows]
      widths = [max(len(c) for c in col) for col in zip(head, *body)]
      fmt = lambda cells: "  ".join(  # noqa: E731  (text left, numbers right)
          c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
      rule = "-" * len(fmt(head))
      out += [rule, fmt(head), rule, *map(fmt, body), rule]
    ratio = self.float_memory_mbit / self.memory_mbit if self.memory_bits else math.nan
    out += [
        f"params        {self.params:>15,}  (binary {self.binary_params:,}, "
        f"real {self.real_params:,})",
        f"memory        {self.memory_mbit:>15.2f} Mbit  (float32: {self.float_memory_mbit:.2f} "
        f"Mbit, {ratio:.2f}x smaller)",
        f"BOPs          {self.bops:>15,}",
        f"FLOPs         {self.flops:>15,}",
        f"OPs           {self.ops:>15.4e}  (BOPs/64 + FLOPs)",
    ]
    return "\n".join(out)

  def __str__(self) -> str:
    return self.table()


def _shape(s) -> str:
  return "x".join(str(int(d)) for d in s)


def _size(shape) -> int:
  return int(math.prod(shape))


def _is_binary_layer(module: nn.Module) -> bool:
  # Only a layer that declares both quantizers can be binary; nn.Conv / nn.Dense are real.
  if not (hasattr(module, "input_quantizer") and hasattr(module, "kernel_quantizer")):
    return False
  return (quantizers.is_binary(module.input_quantizer)
          and quantizers.is_binary(module.kernel_quantizer))


def _has_binary_kernel(module: nn.Module) -> bool:
  kq = getattr(module, "kernel_quantizer", None)
  return kq is not None and quantizers.is_binary(kq)


def summarize(model: nn.Module, input_shape: Sequence[int], *, dtype=jnp.float32,
              name: Optional[str] = None, **call_kwargs: Any) -> Summary:
  """Trace `model.init` on an input of `input_shape` and count every layer.

  `input_shape` includes the batch dimension (use 1: MACs are reported per image). Extra keyword
  arguments go to the model's `__call__` (for `BiRealNet`, the default `train=False`).
  A kernel counts as binary memory when its `kernel_quantizer` is binary; its MACs count as BOPs
  only when the layer's input quantizer is binary too.
  """
  input_shape = tuple(int(d) for d in input_shape)
  if len(input_shape) < 2:
    raise ValueError(f"input_shape must include the batch dimension, got {input_shape}")
  batch = input_shape[0]
  calls: list[tuple] = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      module = context.module
      params = module.variables.get("params", {})
      # Only the module's own leaves: children appear as nested dicts and get their own row.
      own = {k: v for k, v in params.items() if not hasattr(v, "items")}
      if own:
        calls.append((module, tuple(module.scope.path), own, out))
    return out

  def init(rng, x):
    with nn.intercept_methods(record):
      return model.init(rng, x, **call_kwargs)

  variables = jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct(input_shape, dtype))

  rows, seen = [], set()
  for module, path, own, out in calls:
    kernel = own.get("kernel")
    kernel_shape = tuple(kernel.shape) if kernel is not None else None
    n_own = sum(_size(v.shape) for v in own.values())
    n_binary = _size(kernel_shape) if kernel_shape and _has_binary_kernel(module) else 0
    if path in seen:  # a shared module: count its parameters once, its MACs per call
      n_own = n_binary = 0
    seen.add(path)
    macs = 0
    out_shape = tuple(out.shape) if hasattr(out, "shape") else ()
    if kernel_shape and out_shape and (isinstance(module, (nn.Conv, nn.Dense))
                                       or hasattr(module, "kernel_quantizer")):
      # The kernel's last axis is the output feature (HWIO / [in, out]; grouped convs store
      # in/groups), so every output element costs kernel.size / out MACs.
      macs = _size(out_shape) // batch * (_size(kernel_shape) // kernel_shape[-1])
    binary = _is_binary_layer(module)
    rows.append(Row("/".join(path) or "<root>", type(module).__name__, out_shape, kernel_shape,
                    binary, n_binary, n_own - n_binary, macs if binary else 0,
                    0 if binary else macs))

  # Every trainable parameter must land in some row; if a module escaped interception, say so.
  total = sum(_size(v.shape) for v in jax.tree.leaves(variables.get("params", {})))
  counted = sum(r.binary_params + r.real_params for r in rows)
  if total != counted:
    rows.append(Row("<unattributed>", "-", (), None, False, 0, total - counted, 0, 0))
  return Summary(name or type(model).__name__, input_shape, tuple(rows))


def summarize_model(name: str, image_size: int = 224, num_classes: int = 1000,
                    channels: int = 3, **overrides: Any) -> Summary:
  """Summary of a registered model (`models.get(name, ...)`) on one `image_size`² image."""
  model = models.get(name, num_classes=num_classes, **overrides)
  return summarize(model, (1, image_size, image_size, channels), name=name)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="bireal-jax-summary",
      description="Per-layer parameters, memory (Mbit), BOPs, FLOPs and OPs of a Bi-Real model.")
  parser.add_argument("--model", default="bireal18", help=f"one of {models.names()}")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--num-classes", type=int, default=1000)
  parser.add_argument("--channels", type=int, default=3, help="input channels")
  parser.add_argument("--stem", choices=("imagenet", "small"), default=None,
                      help="default: the model's own (imagenet)")
  parser.add_argument("--base-width", type=int, default=None)
  parser.add_argument("--totals-only", action="store_true", help="skip the per-layer table")
  args = parser.parse_args(argv)
  if args.model not in models.names():
    parser.error(f"unknown model {args.model!r}; expected one of {models.names()}")
  for flag in ("image_size", "num_classes", "channels"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
  overrides = {k: v for k, v in (("stem", args.stem), ("base_width", args.base_width))
               if v is not None}
  summary = summarize_model(args.model, args.image_size, args.num_classes, args.channels,
                            **overrides)
  print(summary.table(layers=not args.totals_only))
  return 0


def run() -> None:
  """Console script `bireal-jax-summary`."""
  sys.exit(main())


if __name__ == "__main__":
  run()
