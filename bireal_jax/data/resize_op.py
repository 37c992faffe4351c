"""The compiled resize of the input pipelines (csrc/resize.cc): a TensorFlow custom op doing the
antialiased triangle resize of an image region, uint8 in and out, several times faster than
ScaleAndTranslate on float32 (docs/speed.md) and equal to it rounded (tests/
test_imagenet_pipeline.py).

Built on first use with the system compiler (`$CXX`, default g++) against the headers and
library of the installed TensorFlow (`tf.sysconfig`), and cached under `$BIREAL_JAX_CACHE`
(default `~/.cache/bireal_jax`) keyed by the source, the flags, the TensorFlow version and the
CPU (`-march=native`; a shared home directory may serve several machines). This module does not
import jax: the data package runs without it. When the op cannot be had (no compiler, no
headers, a failed build or load) or `BIREAL_RESIZE=tf`, `resize_region_op()` is None and the
pipeline uses ScaleAndTranslate, saying why once.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from bireal_jax.cache import compile_library, library_file
from bireal_jax.data.tf_env import tf

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "resize.cc"

# -ffp-contract=off: no fused multiply-adds, so the sample positions and weights round as
# TensorFlow's own kernel rounds them (measured bit-equal on random regions; with contraction an
# ulp moves now and then, and a pixel with it).
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w"]

_BUILD_TIMEOUT_S = 600

_state: dict = {}  # "op": the loaded function or None, once decided


def _command() -> list[str]:
  # TF's flags after ours: its -std and ABI define must win; its link flags after the source.
  return [os.environ.get("CXX", "g++"), *_FLAGS, *tf.sysconfig.get_compile_flags(), str(SOURCE),
          *tf.sysconfig.get_link_flags()]


def library_path() -> Path:
  return library_file("resize_op", SOURCE.read_bytes(), " ".join(_command()).encode(),
                      tf.__version__.encode())


def _load():
  """The op's Python function, or the reason it cannot be had (a string)."""
  forced = os.environ.get("BIREAL_RESIZE", "").strip().lower()
  if forced == "tf":
    return "BIREAL_RESIZE=tf"
  if forced not in ("", "op"):
    raise ValueError(f"BIREAL_RESIZE={forced!r}: expected 'tf', 'op' or unset")
  if shutil.which(os.environ.get("CXX", "g++")) is None:
    return "no C++ compiler (apt-get install g++)"
  include = Path(tf.sysconfig.get_include())
  if not (include / "tensorflow" / "core" / "framework" / "op_kernel.h").exists():
    return f"no TensorFlow headers under {include}"
  try:
    path = library_path()
    if not path.exists():
      log.info("bireal_jax: compiling the resize op into %s", path)
      compile_library(path, _command(), timeout_s=_BUILD_TIMEOUT_S)
    return tf.load_op_library(str(path)).bireal_resize_region
  except Exception as e:  # noqa: BLE001  (any failure: the pipeline goes on without the op)
    return re.sub(r"\s+", " ", str(e))[:2000] or type(e).__name__


# Called while tf.data traces the map function: AutoGraph must not try to convert the build
# (a subprocess, file checks), which it cannot and would warn about at length.
@tf.autograph.experimental.do_not_convert
def resize_region_op():
  """`fn(image, region, size)`: uint8 [H, W, 3], float32 (top, left, height, width), int32
  (out_h, out_w) -> uint8 [out_h, out_w, 3], or None (the reason logged once)."""
  if "op" not in _state:
    got = _load()
    if isinstance(got, str):
      (log.info if got == "BIREAL_RESIZE=tf" else log.warning)(
          "bireal_jax: compiled resize op not used (%s): ScaleAndTranslate instead", got)
      got = None
    _state["op"] = got
  return _state["op"]


def reset() -> None:
  """Forget the decision (tests changing BIREAL_RESIZE)."""
  _state.clear()
