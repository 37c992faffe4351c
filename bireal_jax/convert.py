"""Weight converters into this library's Flax variables.

Sources:
  * the authors' PyTorch checkpoints (github liuzechun/Bi-Real-net, `pytorch_implementation/`):
    Bi-Real-18/34 (`BiReal18_34`, flat binary kernels) and Bi-Real-50/152 (`BiReal_50`);
  * larq-zoo's Keras `BiRealNet` weights (`.h5`, e.g. its `birealnet_weights.h5`).

Each converter returns a `Converted`: the model name, the model options the weights need
(`converted.model()` builds it) and `variables = {"params", "batch_stats"}` as float32 numpy.
Importing this module imports neither torch nor TensorFlow: torch is imported only inside
`load_pytorch` when it reads a file, and h5py inside `load_larq`.

Command line:
  python -m bireal_jax.convert --from pytorch --input model_best.pth.tar --output DIR
  python -m bireal_jax.convert --from larq --input birealnet_weights.h5 --output DIR
writes DIR as a float export (`bireal_jax.deploy`), read back by `deploy.load(DIR)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import re
import sys
import warnings
from typing import Any, Iterable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from bireal_jax import models

# name -> (block, blocks per stage), e.g. "bireal18": ("basic", (4, 4, 4, 4))
ARCHS = {n: (a["block"], tuple(a["stage_sizes"])) for n, a in models.ARCHS.items()}
# larq-zoo builds every BatchNormalization with Keras' default epsilon and momentum=0.8; the
# .h5 weights file does not store either, so they are constants of the source.
LARQ_BN_EPSILON = 1e-3
LARQ_BN_MOMENTUM = 0.8
# The official Bi-Real-50 creates `down_conv1x1` in its first block but never calls it.
_UNUSED_TORCH_KEYS = ("layers.0.down_conv1x1.weight",)


class ConversionError(ValueError):
  """The source weights do not fit the requested or inferred model."""


@dataclasses.dataclass
class Converted:
  """Converted weights: `model()` builds the matching `BiRealNet`, `variables` go to `apply`."""

  name: str
  overrides: dict
  variables: dict
  source: str = ""

  def model(self, **more: Any):
    """`models.get(name, **overrides, **more)`; `more` may set e.g. `dtype`."""
    return models.get(self.name, **{**self.overrides, **more})


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _check_name(model: Optional[str]) -> Optional[str]:
  if model is not None and model not in ARCHS:
    raise ConversionError(f"unknown model {model!r}; expected one of {sorted(ARCHS)}")
  return model


def variable_shapes(name: str, in_channels: int = 3, **overrides: Any) -> dict:
  """Flat {(collection, *path): shape} of `models.get(name, **overrides)`, without computing."""
  net = models.get(name, **overrides)
  shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 64, 64, in_channels)))
  flat = {}

  def walk(prefix, tree):
    for k, v in tree.items():
      if isinstance(v, Mapping):
        walk(prefix + (k,), v)
      else:
        flat[prefix + (k,)] = tuple(v.shape)

  walk((), dict(shapes))
  return flat


def _nest(flat: Mapping[tuple, np.ndarray]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def _natural(key: str) -> list:
  """Sort key putting 'layer1.2' before 'layer1.10'."""
  return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key)]


def _fmt_keys(keys: Iterable[str], n: int = 6) -> str:
  keys = list(keys)
  s = ", ".join(repr(k) for k in keys[:n])
  return s + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def n_params(variables: Mapping) -> int:
  """Number of trainable scalars in `variables['params']`."""
  total = 0
  stack = [variables["params"]]
  while stack:
    t = stack.pop()
    for v in t.values():
      if isinstance(v, Mapping):
        stack.append(v)
      else:
        total += int(np.prod(np.shape(v)))
  return total


# ---------------------------------------------------------------------------------------------
# PyTorch (authors' checkpoints)
# ---------------------------------------------------------------------------------------------


def official_key(path: tuple, block: str) -> str:
  """Official state-dict key of one of our variables, e.g.
  ('params', 'layer2_0', 'downsample', 'conv', 'kernel') -> 'layer2.0.downsample.1.weight'."""
  coll, *mods, leaf = path
  parts = []
  for i, m in enumerate(mods):
    if re.fullmatch(r"layer(\d+)_(\d+)|layers_(\d+)", m):
      parts.append(m.replace("_", "."))
    elif i > 0 and mods[i - 1] == "downsample":  # nn.Sequential(AvgPool2d, Conv2d, BatchNorm2d)
      parts.append({"conv": "1", "bn": "2"}[m])
    else:
      parts.append(m)
  if coll == "batch_stats":
    leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
  elif leaf == "kernel":
    # BiReal18_34's HardBinaryConv names its (flat) latent kernel `weights`.
    leaf = "weights" if (block == "basic" and mods[-1] == "binary_conv") else "weight"
  elif leaf == "scale":
    leaf = "weight"
  return ".".join(parts + [leaf])


def _to_numpy(key: str, v: Any) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor, without importing torch
    v = v.detach().cpu()
    v = v.float() if v.is_floating_point() else v
    v = v.numpy()
  try:
    return np.asarray(v)
  except Exception as e:  # e.g. a nested dict in place of a tensor
    raise ConversionError(f"state-dict entry {key!r} is a {type(v).__name__}, not a tensor") from e


def _is_binary(path: tuple, block: str) -> bool:
  """Whether the kernel at `path` is binarised (the first bottleneck's conv1 is real)."""
  if path[0] != "params" or path[-1] != "kernel" or len(path) != 4:
    return False
  if block == "basic":
    return path[2] == "binary_conv"
  return path[2] in ("conv2", "conv3") or (path[2] == "conv1" and path[1] != "layers_0")


def infer_pytorch_model(keys: Iterable[str]) -> str:
  """Model name from the keys of an official state dict (without `module.`)."""
  keys = list(keys)
  layers = {int(m.group(1)) for k in keys if (m := re.match(r"layers\.(\d+)\.", k))}
  if layers:
    for name, (block, stages) in ARCHS.items():
      if block == "bottleneck" and layers == set(range(sum(stages))):
        return name
    raise ConversionError(
        f"bottleneck state dict with blocks 'layers.0'..'layers.{max(layers)}' "
        f"({len(layers)} blocks) matches none of bireal50 (16 blocks) or bireal152 (50 blocks)")
  found = []
  for s in range(1, 5):
    idx = {int(m.group(1)) for k in keys if (m := re.match(rf"layer{s}\.(\d+)\.", k))}
    found.append(max(idx) + 1 if idx else 0)
  for name, (block, stages) in ARCHS.items():
    if block == "basic" and tuple(found) == stages:
      return name
  raise ConversionError(
      f"state dict has blocks per stage {found} (keys 'layer1.*'..'layer4.*'), which matches "
      f"none of bireal18 {list(ARCHS['bireal18'][1])} or bireal34 {list(ARCHS['bireal34'][1])}")


def unwrap_pytorch(obj: Any) -> dict:
  """The state dict of an official checkpoint (dict with `state_dict`) or a bare state dict,
  with DataParallel's `module.` prefix removed."""
  if not isinstance(obj, Mapping):
    raise ConversionError(f"expected a checkpoint dict or a state dict, got {type(obj).__name__}")
  sd = obj.get("state_dict", obj)
  if not isinstance(sd, Mapping):
    raise ConversionError(f"checkpoint entry 'state_dict' is a {type(sd).__name__}, not a dict")
  out = {}
  for k, v in sd.items():
    k2 = k[len("module."):] if k.startswith("module.") else k
    if k2 in out:
      raise ConversionError(f"state dict holds {k2!r} both with and without 'module.'")
    out[k2] = v
  return out


def from_pytorch(state_dict: Any, model: Optional[str] = None) -> Converted:
  """Convert an official PyTorch state dict (or the `.pth.tar` dict around it) to Flax.

  `model` ("bireal18", "bireal34", "bireal50", "bireal152") is checked against the keys; `None`
  infers it. Keys may carry `module.`. Every key must be used and every shape must match:
  errors name the key and the expected and found shapes. `num_classes` (and `base_width` if not
  64) come from the weights.
  """
  sd = unwrap_pytorch(state_dict)
  model = _check_name(model)
  inferred = None
  try:
    inferred = infer_pytorch_model(sd)
  except ConversionError:
    if model is None:
      raise
  name = model or inferred
  block = ARCHS[name][0]

  for k in ("conv1.weight", "fc.weight"):
    if k not in sd:
      raise ConversionError(f"state dict has no {k!r} (needed by {name})")
  conv1 = _to_numpy("conv1.weight", sd["conv1.weight"])
  fc = _to_numpy("fc.weight", sd["fc.weight"])
  if conv1.ndim != 4 or fc.ndim != 2:
    raise ConversionError(f"'conv1.weight' must be 4-D and 'fc.weight' 2-D, got shapes "
                          f"{conv1.shape} and {fc.shape}")
  overrides: dict = {"num_classes": int(fc.shape[0])}
  if conv1.shape[0] != 64:
    overrides["base_width"] = int(conv1.shape[0])
  template = variable_shapes(name, int(conv1.shape[1]), **overrides)
  expected = {official_key(p, block): (p, shape) for p, shape in template.items()}

  ignorable = set(_UNUSED_TORCH_KEYS if block == "bottleneck" else ())
  ignorable |= {k[:-len("running_mean")] + "num_batches_tracked"
                for k in expected if k.endswith(".running_mean")}
  missing = sorted((k for k in expected if k not in sd), key=_natural)
  extra = [k for k in sd if k not in expected and k not in ignorable]
  if missing or extra:
    hint = (f"; the keys look like {inferred}" if inferred and inferred != name else "")
    msg = [f"state dict does not fit {name}{hint}:"]
    if missing:
      msg.append(f"missing {len(missing)} key(s): {_fmt_keys(missing)}")
    if extra:
      msg.append(f"unexpected {len(extra)} key(s): {_fmt_keys(extra)}")
    raise ConversionError(" ".join(msg))

  flat, zeros = {}, {}
  for key, (path, shape) in expected.items():
    v = _to_numpy(key, sd[key]).astype(np.float32)
    if _is_binary(path, block) and (nz := int(np.sum(v == 0))):
      zeros[key] = nz
    if len(shape) == 4:  # ours HWIO, theirs OIHW (BiReal18_34 binary kernels stored flat)
      h, w, i, o = shape
      oihw = (o, i, h, w)
      if path[-2] == "binary_conv" and v.shape == (o * i * h * w, 1):
        v = v.reshape(oihw)
      if v.shape != oihw:
        want = f"{(o * i * h * w, 1)} (flat) or {oihw}" if path[-2] == "binary_conv" else oihw
        raise ConversionError(f"{key!r} has shape {tuple(v.shape)}, expected {want} for {name}")
      v = v.transpose(2, 3, 1, 0)
    elif len(shape) == 2:  # Dense kernel [in, out] <- Linear weight [out, in]
      if v.shape != shape[::-1]:
        raise ConversionError(f"{key!r} has shape {tuple(v.shape)}, expected {shape[::-1]} "
                              f"for {name}")
      v = v.T
    elif v.shape != shape:
      raise ConversionError(f"{key!r} has shape {tuple(v.shape)}, expected {shape} for {name}")
    flat[path] = np.ascontiguousarray(v)
  if zeros:
    where = ", ".join(f"{k!r}: {n}" for k, n in zeros.items())
    warnings.warn(f"{sum(zeros.values())} binary latent weight(s) are exactly 0 ({where}): "
                  f"PyTorch's sign(0) = 0 drops them, bireal_jax binarises them to +alpha, so "
                  f"outputs can differ from the PyTorch model", stacklevel=2)
  return Converted(name, overrides, _nest(flat), source="pytorch")


def load_pytorch(path_or_obj: Any, model: Optional[str] = None, trusted: bool = False) -> Converted:
  """`from_pytorch` on a `.pth` / `.pth.tar` file (needs torch) or an already loaded object.

  Files are read with `torch.load(weights_only=True)`; `trusted=True` allows arbitrary pickles
  (only for files you trust).
  """
  if isinstance(path_or_obj, (str, os.PathLike)):
    try:
      import torch  # local: reading a .pth needs torch, nothing else here does
    except ImportError as e:
      raise ImportError("reading a PyTorch checkpoint needs torch (CPU wheel is enough: "
                        "pip install torch)") from e
    try:
      obj = torch.load(os.fspath(path_or_obj), map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:  # what weights_only=True raises on other objects
      if trusted:
        raise
      raise ConversionError(f"torch.load(weights_only=True) could not read {path_or_obj!s}: {e}; "
                            f"if you trust the file, pass trusted=True (--trusted-pickle)") from e
    return from_pytorch(obj, model)
  return from_pytorch(path_or_obj, model)


# ---------------------------------------------------------------------------------------------
# larq-zoo (Keras .h5)
# ---------------------------------------------------------------------------------------------


def _str(v) -> str:
  return v.decode("utf8") if isinstance(v, bytes) else str(v)


def read_keras_h5(path: Union[str, os.PathLike]) -> list:
  """[(layer_name, {weight: array})] for the layers with weights, in the file's order.

  Reads files from Keras `save_weights(...h5)` and from full-model `.h5` saves."""
  import h5py  # local: only this converter needs it

  with h5py.File(path, "r") as f:
    g = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in g.attrs:
      raise ConversionError(f"{path!s} is not a Keras HDF5 weights file (no 'layer_names')")
    layers = []
    for lname in map(_str, g.attrs["layer_names"]):
      wnames = [_str(w) for w in g[lname].attrs.get("weight_names", [])]
      if wnames:
        # 'batch_normalization_3/gamma:0' -> 'gamma'
        ws = {w.split("/")[-1].split(":")[0]: np.asarray(g[lname][w], np.float32) for w in wnames}
        layers.append((lname, ws))
  return layers


def _kind(ws: Mapping[str, np.ndarray]) -> str:
  if set(ws) == {"gamma", "beta", "moving_mean", "moving_variance"}:
    return "bn"
  if set(ws) == {"kernel"} and ws["kernel"].ndim == 4:
    return "conv"
  if set(ws) == {"kernel", "bias"} and ws["kernel"].ndim == 2:
    return "dense"
  return "unknown (" + ", ".join(f"{k}{tuple(v.shape)}" for k, v in ws.items()) + ")"


def _larq_order(template: Mapping[tuple, tuple], name: str) -> list:
  """Our modules in the order larq-zoo's Keras model lists its layers with weights.

  Keras `load_weights` (by_name=False, how larq-zoo loads its own .h5) pairs layers by this
  order. In a downsampling block it is: binary conv, shortcut 1×1 conv, block BN, shortcut BN."""
  out = [("conv", ("conv1",)), ("bn", ("bn1",))]
  for s, n in enumerate(ARCHS[name][1]):
    for i in range(n):
      b = f"layer{s + 1}_{i}"
      if ("params", b, "downsample", "conv", "kernel") in template:
        out += [("conv", (b, "binary_conv")), ("conv", (b, "downsample", "conv")),
                ("bn", (b, "bn1")), ("bn", (b, "downsample", "bn"))]
      else:
        out += [("conv", (b, "binary_conv")), ("bn", (b, "bn1"))]
  return out + [("dense", ("fc",))]


def from_larq_layers(layers: list, model: Optional[str] = None) -> Converted:
  """Convert `read_keras_h5` output of larq-zoo's BiRealNet (include_top=True) to Flax."""
  model = _check_name(model)
  n_binary = sum(1 for _, ws in layers
                 if _kind(ws) == "conv" and ws["kernel"].shape[:2] == (3, 3))
  basic = {sum(st): nm for nm, (blk, st) in ARCHS.items() if blk == "basic"}
  if model is None:
    if n_binary not in basic:
      raise ConversionError(f"found {n_binary} 3×3 conv layers; larq-zoo's BiRealNet (bireal18) "
                            f"has 16 (bireal34 would have 32)")
    model = basic[n_binary]
  if ARCHS[model][0] != "basic":
    raise ConversionError(f"larq-zoo has no {model}; only basic-block models convert from larq")
  if not layers or _kind(layers[-1][1]) != "dense":
    raise ConversionError("the .h5 has no final Dense layer: convert a model saved with "
                          "include_top=True")
  dense = layers[-1][1]
  conv1 = layers[0][1].get("kernel")
  in_ch = int(conv1.shape[2]) if conv1 is not None and conv1.ndim == 4 else 3
  overrides = dict(num_classes=int(dense["kernel"].shape[1]), padding="same",
                   bn_epsilon=LARQ_BN_EPSILON, bn_momentum=LARQ_BN_MOMENTUM)
  if conv1 is not None and conv1.ndim == 4 and conv1.shape[3] != 64:
    overrides["base_width"] = int(conv1.shape[3])
  template = variable_shapes(model, in_ch, **overrides)
  order = _larq_order(template, model)
  if len(layers) != len(order):
    raise ConversionError(f"the .h5 has {len(layers)} layers with weights, {model} needs "
                          f"{len(order)} ({n_binary} 3×3 convs found, "
                          f"{sum(ARCHS[model][1])} expected)")
  flat = {}
  for (lname, ws), (kind, mod) in zip(layers, order):
    where = f"Keras layer {lname!r} (for {'/'.join(mod)})"
    if _kind(ws) != kind:
      raise ConversionError(f"{where} is a {_kind(ws)} layer, expected {kind}")
    if kind == "bn":
      pairs = [("params", "scale", "gamma"), ("params", "bias", "beta"),
               ("batch_stats", "mean", "moving_mean"), ("batch_stats", "var", "moving_variance")]
    elif kind == "conv":
      pairs = [("params", "kernel", "kernel")]
    else:
      pairs = [("params", "kernel", "kernel"), ("params", "bias", "bias")]
    for coll, ours, theirs in pairs:
      path = (coll, *mod, ours)
      want, got = template[path], tuple(ws[theirs].shape)
      if got != want:  # Keras conv kernels are HWIO and Dense [in, out], as ours
        raise ConversionError(f"{where}: {theirs!r} has shape {got}, expected {want}")
      flat[path] = ws[theirs]
  return Converted(model, overrides, _nest(flat), source="larq")


def load_larq(path: Union[str, os.PathLike], model: Optional[str] = None) -> Converted:
  """Convert larq-zoo BiRealNet weights (`.h5`) to Flax.

  The returned model options make outputs match larq-zoo: `padding="same"` (Keras pads stride-2
  convs and pools only after), `bn_epsilon=1e-3` (Keras default) and `bn_momentum=0.8`. The
  model outputs logits; larq-zoo's model ends in a softmax.
  """
  return from_larq_layers(read_keras_h5(path), model)


# ---------------------------------------------------------------------------------------------
# Files and command line
# ---------------------------------------------------------------------------------------------


def save(converted: Converted, out_dir: Union[str, os.PathLike]) -> str:
  """Write `converted` as a float export (`bireal_jax.deploy` format) to `out_dir`, replacing
  one already there; `deploy.load(out_dir)` reads it back. Returns the directory."""
  from bireal_jax import deploy

  source = {"kind": "converted", "from": converted.source, "name": converted.name,
            "overrides": converted.overrides}
  return deploy.save(out_dir, converted.model(), converted.variables, source=source,
                     overwrite=True)


def main(argv: Optional[list] = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m bireal_jax.convert",
      description="Convert Bi-Real Net weights (authors' PyTorch checkpoints or larq-zoo .h5) "
                  "to a bireal_jax float export (DIR/model.json + DIR/variables/), read by "
                  "bireal_jax.deploy.load(DIR).")
  p.add_argument("--from", dest="source", required=True, choices=("pytorch", "larq"))
  p.add_argument("--model", choices=sorted(ARCHS), default=None,
                 help="checked against the weights; inferred when omitted")
  p.add_argument("--input", required=True, help=".pth/.pth.tar (pytorch) or .h5 (larq)")
  p.add_argument("--output", required=True, help="output directory")
  p.add_argument("--trusted-pickle", action="store_true",
                 help="pytorch: allow arbitrary pickled objects (torch.load weights_only=False)")
  a = p.parse_args(argv)
  try:
    if a.source == "pytorch":
      conv = load_pytorch(a.input, a.model, trusted=a.trusted_pickle)
    else:
      conv = load_larq(a.input, a.model)
  except (ConversionError, ImportError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  path = save(conv, a.output)
  print(f"{a.source} -> {conv.name} {conv.overrides}: {n_params(conv.variables):,} parameters")
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
