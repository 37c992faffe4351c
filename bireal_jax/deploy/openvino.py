"""OpenVINO IR of a packed Bi-Real Net, and running it on OpenVINO's CPU plugin.

    from bireal_jax import deploy
    deploy.export_openvino("runs/demo/inference", "b18_ov")    # b18_ov/model.xml + model.bin
    logits = deploy.load("runs/demo/inference")(images, impl="openvino")

`openvino` is an optional extra (`pip install 'bireal_jax[openvino]'`), imported only inside the
functions here. The IR (NCHW inside, NHWC float32 images in, float32 logits out):
  * real convs (stem, shortcuts, Bi-Real-50's first 1×1) are `Convolution`s with float32 weights,
    their folded BN a per-channel `Multiply` + `Add`; the classifier is `MatMul` + `Add`;
  * every binary conv is `FakeQuantize(levels=2) → BinaryConvolution(xnor-popcount, pad 0)` with
    u1 weights, followed by its folded α·BN affine (`Multiply` + `Add`, fused by the plugin).
    The CPU plugin runs it with its u1 (XNOR/popcount) kernel only when the activation is
    binarised by such a FakeQuantize; `pad_value=0` excludes the padding from the sum, which is
    exactly zero padding of the signed input (what `ops/bits.py` computes).
  * `FakeQuantize(levels=2)` sends `x <= threshold` to its low level (−1 here). bireal_jax's sign
    has sign(0) = +1, so the threshold is `SIGN_THRESHOLD` = −2⁻¹²⁶, the negative normal float32
    closest to 0: 0 and −0.0 go to +1 (threshold 0 would send them to −1), every normal x < 0 to
    −1, and negative subnormals to +1, as in the JAX forward, whose XLA CPU code flushes them to
    0 (`x >= 0` holds there); the same with or without the plugin's denormal flushing, and
    exact in bf16 too. Weights are saved uncompressed (fp16 would round it to −0).
  * u1 weights are bit `i` of byte `i // 8` LSB-first over the OIHW order, 1 = +1
    (`np.packbits(..., bitorder="little")`; MSB-first gives wrong sums).
  * an exported IR keeps the model.json facts (`format.metadata`) in its rt_info under
    `RT_INFO_KEY`. This module knows a packed model only by its attributes (`pm.config`, its
    packed tree), so `deploy.model` can run it without an import circle (`deploy.export` loads
    paths and writes IR files).
Two defects of the 2026.4 CPU plugin, measured, shape the IR: a binary conv's residual sum that
feeds only the next sign is given a second consumer (output `GUARD_OUTPUT`, Bi-Real-50/152), and
binary convs whose input channels are not a multiple of `CHANNEL_MULTIPLE` are refused.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Union

import numpy as np

from bireal_jax import models
from bireal_jax.deploy import fold
from bireal_jax.models import plan
from bireal_jax.ops.bits import WORD_BITS

EXTRA = "pip install 'bireal_jax[openvino]'"
MIN_VERSION = "2026.4"
IR_FILE = "model.xml"  # and model.bin beside it
RT_INFO_KEY = "bireal_jax"
PRECISIONS = ("f32", "bf16")
SIGN_THRESHOLD = -np.finfo(np.float32).tiny  # −2⁻¹²⁶: see the module docstring
# The plugin's u1 binary conv: what `runtime_layer_types` reports for it.
BINARY_LAYER_TYPE = "BinaryConvolution"
GUARD_OUTPUT = "unfused_sums"
# OpenVINO 2026.4's CPU BinaryConvolution is exact only for input channels a multiple of 8 (with
# 12, 33 or 37 channels even an all-+1 kernel gave sums off by up to 32); Bi-Real widths are.
CHANNEL_MULTIPLE = 8


def require():
  """The `openvino` module, or an ImportError that names the extra to install."""
  try:
    import openvino
  except ImportError as e:
    raise ImportError(f"OpenVINO export and impl='openvino' need the optional package openvino>="
                      f"{MIN_VERSION}, which could not be imported ({e}); install it with: "
                      f"{EXTRA}") from e
  return openvino


def check_exportable(config: Mapping[str, Any]) -> None:
  """Raise ValueError where the IR could not compute the model `config` exactly."""
  try:  # the IR is built from the packed tree: what cannot be packed cannot be exported
    fold.check_packable(models.from_config(dict(config)))
  except ValueError as e:
    raise ValueError(f"cannot export to OpenVINO: {e}") from None


def u1_weights(bits, in_channels: int, name: str = "kernel"):
  """The OpenVINO u1 constant [O, C, kh, kw] of a packed kernel `bits[kh, kw, ceil(C/32), O]`
  (`ops/bits.py`: bit 1 = −1) for `in_channels` = C: bit 1 = +1, LSB-first over OIHW."""
  ov = require()
  bits = np.asarray(bits, np.uint32)
  kh, kw, nw, o = bits.shape
  if -(-in_channels // WORD_BITS) != nw:
    raise ValueError(f"{name}: input has {in_channels} channels but the packed kernel "
                     f"{bits.shape} has {nw} words per tap")
  neg = (bits[:, :, :, None, :] >> np.arange(WORD_BITS, dtype=np.uint32)[:, None]) & 1
  plus = neg.reshape(kh, kw, nw * WORD_BITS, o)[:, :, :in_channels] == 0
  packed = np.packbits(plus.transpose(3, 2, 0, 1).reshape(-1), bitorder="little")
  t = ov.Tensor(ov.Type.u1, ov.Shape([o, in_channels, kh, kw]))
  if t.data.size != packed.size:
    raise RuntimeError(f"{name}: a u1 tensor of {o}x{in_channels}x{kh}x{kw} holds "
                       f"{t.data.size} bytes, packed {packed.size}: this openvino lays out u1 "
                       f"unlike {MIN_VERSION}")
  t.data[:] = packed
  return ov.op.Constant(t, shared_memory=False)


def sign_bits(x, name: Optional[str] = None):
  """`FakeQuantize(levels=2)` of `x` to {0, 1} = {−1, +1} with bireal_jax's sign (x >= 0 → +1),
  the activation a `BinaryConvolution` runs its u1 kernel on."""
  ov = require()
  thr = np.float32(SIGN_THRESHOLD)
  return ov.opset13.fake_quantize(x, thr, thr, np.float32(0), np.float32(1), 2, name=name)


class _Builder:
  """Adds the nodes of the packed forward (`forward.py`'s walk of `models/plan.py`) in NCHW."""

  def __init__(self, ov):
    self.ov = ov
    self.op = ov.opset13
    self.binary_convs = 0
    self.signed = []  # the inputs of the sign FakeQuantizes

  @staticmethod
  def channels(x) -> int:
    return x.get_output_partial_shape(0)[1].get_length()

  @staticmethod
  def _vec(v):
    return np.asarray(v, np.float32).reshape(1, -1, 1, 1)

  def affine(self, x, e, name):
    if "scale" not in e:
      return x
    x = self.op.multiply(x, self._vec(e["scale"]), name=f"{name}/scale")
    return self.op.add(x, self._vec(e["bias"]), name=f"{name}/bias")

  def real(self, x, e, stride, pad, name):
    kernel = np.ascontiguousarray(np.transpose(np.asarray(e["kernel"], np.float32), (3, 2, 0, 1)))
    x = self.op.convolution(x, kernel, [stride] * 2, [pad] * 2, [pad] * 2, [1, 1], name=name)
    return self.affine(x, e, name)

  def binary(self, x, e, stride, pad, name):
    ov, cin = self.ov, self.channels(x)
    if cin % CHANNEL_MULTIPLE:
      raise ValueError(f"cannot export to OpenVINO: binary conv {name} has {cin} input channels; "
                       f"expected a multiple of {CHANNEL_MULTIPLE} (the CPU plugin's u1 "
                       f"BinaryConvolution gives wrong sums otherwise; base_width a multiple "
                       f"of {CHANNEL_MULTIPLE} avoids it)")
    weights = u1_weights(e["bits"], cin, name)
    self.signed.append(x)
    xb = sign_bits(x, f"{name}/sign")
    y = ov.opset1.binary_convolution(xb, weights, [stride] * 2,
                                     [pad] * 2, [pad] * 2, [1, 1], "xnor-popcount", 0.0,
                                     name=name)
    self.binary_convs += 1
    return self.affine(y, e, name)

  def avg_pool(self, x, s, name):
    # flax avg_pool SAME, count_include_pad=False: odd edges pad at the end, mean over valid pixels
    return self.ov.opset1.avg_pool(x, [s, s], [0, 0], [0, 0], [s, s], True, "floor", "same_upper",
                                   name=name)

  def downsample(self, x, e, stride, name):
    if stride > 1:
      x = self.avg_pool(x, stride, f"{name}/pool")
    return self.real(x, e, 1, 0, name)

  def leaky_clip(self, x, name):
    op = self.op
    lo = op.add(op.multiply(x, np.float32(0.1)), np.float32(-0.9))
    hi = op.add(op.multiply(x, np.float32(0.1)), np.float32(0.9))
    inner = op.select(op.greater(x, np.float32(1)), hi, x)
    return op.select(op.less(x, np.float32(-1)), lo, inner, name=name)


def _is_residual_sum(node) -> bool:
  """An Add of two computed tensors (not an affine's bias Add)."""
  return node.get_type_name() == "Add" and all(
      i.get_source_output().get_node().get_type_name() != "Constant" for i in node.inputs())


def build(pm, metadata: Optional[Mapping[str, Any]] = None):
  """The `openvino.Model` of the packed model `pm` (a `PackedModel`): input "images" NHWC
  float32 [?, ?, ?, C], output "logits"; `metadata`: model.json facts for the rt_info."""
  ov = require()
  cfg, p = pm.config, pm.params
  check_exportable(cfg)
  b, op = _Builder(ov), ov.opset13
  cin = np.shape(p["stem"]["kernel"])[2]
  images = op.parameter(ov.PartialShape([-1, -1, -1, cin]), np.float32, name="images")
  x = op.transpose(images, np.array([0, 3, 1, 2], np.int64), name="to_nchw")
  if cfg["stem"] == "imagenet":
    x = b.real(x, p["stem"], 2, 3, "stem")
    x = ov.opset1.max_pool(x, [2, 2], [1, 1], [1, 1], [3, 3], "floor", "explicit",
                           name="stem/pool")
  else:
    x = b.real(x, p["stem"], 1, 1, "stem")
  if cfg["block"] == "basic":
    for u in plan.basic_plan(cfg["stage_sizes"], cfg["base_width"], cfg["shortcut"]):
      n0, e = u.names[0], p[u.names[0]]
      if u.kind == "bireal":
        y = b.binary(x, e, u.stride, 1, n0)
        sc = b.downsample(x, e[u.downsample_name], u.stride, f"{n0}/downsample") \
            if u.downsample else x
        x = op.add(y, sc, name=f"{n0}/add")
      elif u.kind == "pair":
        y = b.binary(x, e, u.stride, 1, n0)
        y = b.binary(y, p[u.names[1]], 1, 1, u.names[1])
        sc = b.downsample(x, p[u.downsample_name], u.stride, u.downsample_name) \
            if u.downsample else x
        x = op.add(y, sc, name=f"{u.names[1]}/add")
      else:
        x = b.binary(x, e, u.stride, 1, n0)
  else:
    x1 = x2 = x
    for u in plan.bottleneck_plan(cfg["stage_sizes"], cfg["base_width"]):
      e, n = p[u.name], u.name
      if u.is_first:
        out1 = b.real(b.leaky_clip(x2, f"{n}/leaky_clip"), e["conv1"], 1, 0, f"{n}/conv1")
      else:
        out1 = b.binary(x2, e["conv1"], 1, 0, f"{n}/conv1")
        if u.is_downsample:
          x1 = b.real(x1, e["down_conv1x1"], 1, 0, f"{n}/down_conv1x1")
        out1 = op.add(out1, x1, name=f"{n}/add1")
      out2 = b.binary(out1, e["conv2"], u.stride, 1, f"{n}/conv2")
      mid = b.avg_pool(out1, 2, f"{n}/mid_pool") if u.is_downsample and u.stride == 2 else out1
      out2 = op.add(out2, mid, name=f"{n}/add2")
      out3 = b.binary(out2, e["conv3"], 1, 0, f"{n}/conv3")
      outer = b.downsample(x2, e["downsample"], u.stride, f"{n}/downsample") \
          if u.is_downsample else x2
      x1, x2 = out2, op.add(out3, outer, name=f"{n}/add3")
    x = x2
  x = op.reduce_mean(x, np.array([2, 3], np.int64), False, name="pool")
  x = op.matmul(x, np.asarray(p["fc"]["kernel"], np.float32), False, False, name="fc")
  logits = op.add(x, np.asarray(p["fc"]["bias"], np.float32), name="logits")
  logits.output(0).get_tensor().set_names({"logits"})
  images.output(0).get_tensor().set_names({"images"})
  outputs = [logits]
  # OpenVINO 2026.4's CPU plugin fuses `BinaryConvolution → Add(residual) → sign FakeQuantize`
  # into one node when the sum has no other consumer, and that fused node computes wrong sums
  # (max |ΔD| 18 on a 16-channel test; bf16 fails to compile). Such a sum (Bi-Real-50/152's last
  # block's out2) gets a second consumer, a max reduced to one number in output 1, so that it
  # stays a separate float tensor as every other residual sum is.
  lone = [x for x in b.signed if _is_residual_sum(x) and len(x.output(0).get_target_inputs()) == 1]
  if lone:
    maxes = [op.reduce_max(x, np.array([1, 2, 3], np.int64), False) for x in lone]
    guard = op.concat(maxes, 0) if len(maxes) > 1 else maxes[0]
    guard.output(0).get_tensor().set_names({GUARD_OUTPUT})
    outputs.append(guard)
  model = ov.Model(outputs, [images], "bireal_jax")
  if metadata is not None:  # an export's model.json facts (deploy.export); not for a runner
    model.set_rt_info(json.dumps(dict(metadata), sort_keys=True), [RT_INFO_KEY, "model_json"])
  model.set_rt_info(str(b.binary_convs), [RT_INFO_KEY, "binary_convolutions"])
  return model


def read_metadata(model_or_xml) -> dict:
  """The model.json facts stored in an IR (a path to model.xml or an `openvino.Model`)."""
  ov = require()
  model = model_or_xml
  if isinstance(model, (str, os.PathLike)):
    model = ov.Core().read_model(os.fspath(model))
  if not model.has_rt_info([RT_INFO_KEY, "model_json"]):
    raise ValueError(f"{model_or_xml!r} has no rt_info {RT_INFO_KEY}/model_json: not an IR "
                     f"written by bireal_jax.deploy.export_openvino")
  return json.loads(model.get_rt_info([RT_INFO_KEY, "model_json"]).astype(str))


def compile_config(precision: str = "f32", profile: bool = False) -> dict:
  """CPU plugin properties: inference precision `precision` ("f32" or "bf16"); per-layer
  timings when `profile` (PERF_COUNT)."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
  return {"INFERENCE_PRECISION_HINT": precision, "PERF_COUNT": bool(profile)}


def runtime_layer_types(compiled) -> list[str]:
  """The layer type of every node the CPU plugin executes (its runtime model's rt_info)."""
  return [n.get_rt_info()["layerType"].astype(str)
          for n in compiled.get_runtime_model().get_ordered_ops()]


class Runner:
  """A model's IR compiled for the CPU plugin once per (input shape, precision), and run.

  `runner(images, precision)`: NHWC float images -> float32 logits (numpy). Not thread-safe: one
  infer request per compiled shape.
  """

  def __init__(self, model):
    self.ov = require()
    self.model = model
    self.core = self.ov.Core()
    self._compiled: dict = {}

  @classmethod
  def from_packed(cls, pm) -> "Runner":
    return cls(build(pm))

  @classmethod
  def from_ir(cls, xml: Union[str, os.PathLike]) -> "Runner":
    return cls(require().Core().read_model(os.fspath(xml)))

  def compiled(self, shape, precision: str = "f32", profile: bool = False):
    """(compiled model, infer request) for NHWC input `shape`, compiled on first use."""
    key = (tuple(int(d) for d in shape), precision, bool(profile))
    if key not in self._compiled:
      config = compile_config(precision, profile)
      model = self.model.clone()
      model.reshape(self.ov.PartialShape(list(key[0])))
      c = self.core.compile_model(model, "CPU", config)
      self._compiled[key] = (c, c.create_infer_request())
    return self._compiled[key]

  def __call__(self, images, precision: str = "f32", profile: bool = False) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(images, np.float32))
    if x.ndim != 4:
      raise ValueError(f"expected NHWC images of rank 4, got shape {x.shape}")
    _, req = self.compiled(x.shape, precision, profile)
    req.infer({0: x}, share_inputs=True)
    return req.get_output_tensor(0).data.copy()

  def profile(self, images, precision: str = "f32", repeats: int = 1, group=None) -> dict:
    """Per-layer times of a call (PERF_COUNT) summed by layer type (or by `group(node_name,
    layer_type)`), the median over `repeats` calls: {group: (ms, executed layers)}, slowest
    first."""
    import statistics
    runs: dict = {}
    for _ in range(repeats):
      self(images, precision, profile=True)
      _, req = self.compiled(np.shape(images), precision, True)
      sums: dict = {}
      for info in req.get_profiling_info():
        if info.status != info.Status.EXECUTED:
          continue
        g = group(info.node_name, info.node_type) if group else info.node_type
        ms, k = sums.get(g, (0.0, 0))
        sums[g] = (ms + info.real_time.total_seconds() * 1e3, k + 1)
      for t, v in sums.items():
        runs.setdefault(t, []).append(v)
    out = {t: (statistics.median(ms for ms, _ in v), v[0][1]) for t, v in runs.items()}
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))
