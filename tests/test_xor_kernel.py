"""`ops/cpu/csrc/xor_conv.cc` (the binary convolutions' XOR + popcount forward, an XLA FFI custom
call) built three ways, each loaded here under its own FFI target: `-march=native` (AVX-512
VPOPCNTDQ where the CPU has it), `-march=x86-64-v3` (the AVX2 path) and `-march=x86-64` (the
scalar fallback). Each must equal XLA's f32 convolution of the same operands bit for bit (α a
multiple of 1/8 makes every partial sum exact), and for any α the exact integer sums times α
(so the builds agree), as its pure-JAX twin `ops.bits.xor_popcount_conv` computes them. And the
package's own build (`ops.cpu.xor.xor_conv`): against the f32 conv and the pure-JAX kernel
bit for bit, its custom call, its input checks."""
import ctypes
import os
import platform
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bireal_jax.ops.cpu import binconv, xor

SOURCE = Path(__file__).resolve().parents[1] / "bireal_jax" / "ops" / "cpu" / "csrc" / "xor_conv.cc"
BUILDS = {"native": "native", "avx2": "x86-64-v3", "scalar": "x86-64"}

pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None,
                       reason="g++ not found: the XOR kernel is compiled here (make sysdeps)"),
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU custom call"),
]

# (x shape, kernel HWIO, stride, pad): Bi-Real-18's convolutions at small batch and size, and odd
# ones: channels off the 32-bit word (3, 70) and off the 8/16/32-channel SIMD blocks (5, 36, 70).
SHAPES = [
    ((2, 14, 14, 64), (3, 3, 64, 64), 1, 1),
    ((2, 14, 14, 64), (3, 3, 64, 128), 2, 1),
    ((2, 8, 8, 128), (3, 3, 128, 128), 1, 1),
    ((1, 7, 7, 256), (3, 3, 256, 256), 1, 1),
    ((2, 9, 11, 32), (3, 3, 32, 32), 1, 1),
    ((2, 15, 15, 96), (3, 3, 96, 40), 2, 1),
    ((2, 10, 12, 3), (3, 3, 3, 5), 1, 0),
    ((2, 13, 7, 70), (3, 3, 70, 70), 2, 0),
    ((2, 12, 12, 70), (3, 3, 70, 36), 1, 1),
    ((2, 11, 11, 64), (1, 1, 64, 24), 1, 0),
    ((2, 8, 10, 96), (1, 1, 96, 72), 2, 0),
    ((2, 7, 7, 3), (1, 1, 3, 9), 2, 1),
]


def _cpu_flags() -> set:
  try:
    m = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
  except OSError:
    return set()
  return set(m.group(1).split()) if m else set()


def _skip_reason(build: str):
  if build == "native":
    return None
  if platform.machine() not in ("x86_64", "AMD64"):
    return f"-march={BUILDS[build]} is x86-64 only (this is {platform.machine()})"
  if build == "avx2" and "avx2" not in _cpu_flags():
    return "the CPU lacks AVX2: the -march=x86-64-v3 build cannot run here"
  return None


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
  """build -> FFI target name, or the reason it is skipped; the builds compile in parallel."""
  tmp = tmp_path_factory.mktemp("xor_kernel")
  procs, out = {}, {}
  for build, march in BUILDS.items():
    reason = _skip_reason(build)
    if reason:
      out[build] = pytest.skip.Exception(reason)
      continue
    so = tmp / f"xor_conv_{build}.so"
    cmd = ["g++", "-O3", f"-march={march}", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
           f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(so)]
    procs[build] = (so, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
  for build, (so, cmd, proc) in procs.items():
    _, err = proc.communicate()
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{err}"
    lib = ctypes.cdll.LoadLibrary(str(so))
    name = f"test_xor_conv_{build}_{uuid.uuid4().hex[:8]}"
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(lib.BirealXorConvFwd), platform="cpu")
    out[build] = name
  return out


def _xor_conv(target, x, w, stride, pad):
  return xor.xor_conv(x, w, stride, pad, target=target)


def _run(targets, build, x, w, stride, pad):
  t = targets[build]
  if isinstance(t, BaseException):
    pytest.skip(str(t))
  return np.asarray(jax.jit(lambda a, b: _xor_conv(t, a, b, stride, pad))(x, w))


def _operands(x_shape, k_shape, seed):
  rng = np.random.default_rng(seed)
  x = np.where(rng.standard_normal(x_shape) >= 0, 1.0, -1.0).astype(np.float32)
  signs = np.where(rng.standard_normal(k_shape) >= 0, 1.0, -1.0)
  return x, signs


def _lax(x, w, stride, pad):
  return np.asarray(lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("x_shape,k_shape,stride,pad", SHAPES)
def test_equals_the_f32_conv_exactly(targets, build, x_shape, k_shape, stride, pad):
  x, signs = _operands(x_shape, k_shape, seed=sum(x_shape) + sum(k_shape) + stride + pad)
  # α per output channel a multiple of 1/8: every partial sum of ±α is exact in f32.
  alpha = np.random.default_rng(1).integers(1, 24, k_shape[3]) / 8
  w = (signs * alpha).astype(np.float32)
  np.testing.assert_array_equal(_run(targets, build, x, w, stride, pad), _lax(x, w, stride, pad))


def _builds_run(targets):
  return [b for b in BUILDS if not isinstance(targets[b], BaseException)]


@pytest.mark.parametrize("x_shape,k_shape,stride,pad", SHAPES)
def test_builds_agree_for_any_alpha(targets, x_shape, k_shape, stride, pad):
  x, signs = _operands(x_shape, k_shape, seed=7)
  alpha = np.random.default_rng(2).uniform(0.01, 2.0, k_shape[3]).astype(np.float32)
  w = (signs * alpha).astype(np.float32)
  w[0, 0, 0] *= 0.0  # a ±0 entry: sign bit 0 (+1), α from the rest of its channel
  # The kernel's semantics: the exact integer sums (the f32 conv of the signs), times α in f32.
  want = _lax(x, np.where(w >= 0, 1.0, -1.0).astype(np.float32), stride, pad) * alpha
  for build in _builds_run(targets):
    np.testing.assert_array_equal(_run(targets, build, x, w, stride, pad), want,
                                  err_msg=f"build {build}")


def test_equals_the_jax_twin(targets):
  """`ops.bits.xor_popcount_conv` (pure JAX, packing its own words) × α, for one odd shape."""
  from bireal_jax.ops import bits
  x_shape, k_shape, stride, pad = (2, 9, 8, 70), (3, 3, 70, 36), 2, 1
  x, signs = _operands(x_shape, k_shape, seed=3)
  w = jnp.asarray((signs * np.random.default_rng(4).uniform(0.1, 1.0, k_shape[3]))
                  .astype(np.float32))
  twin = np.asarray(bits.xor_popcount_conv(jnp.asarray(x), bits.pack_kernel(w), stride, pad)
                    .astype(jnp.float32) * jnp.max(jnp.abs(w), axis=(0, 1, 2)))
  for build in _builds_run(targets):
    np.testing.assert_array_equal(_run(targets, build, x, w, stride, pad), twin,
                                  err_msg=f"build {build}")


def test_the_avx2_build_selects_the_avx2_path():
  """The compile-time choice: x86-64-v3 defines AVX2 and not AVX-512, x86-64 neither."""
  if platform.machine() not in ("x86_64", "AMD64"):
    pytest.skip("x86-64 only")
  def macros(march):
    return subprocess.run(["g++", f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
                          capture_output=True, text=True, check=True).stdout
  v3, base = macros("x86-64-v3"), macros("x86-64")
  assert "__AVX2__" in v3 and "__AVX512F__" not in v3
  assert "__AVX2__" not in base


# ---------------------------------------------------------------------------------------------
# The package's own build (`bireal_jax.ops.cpu.xor`, what `ops.binary_conv2d` calls)
# ---------------------------------------------------------------------------------------------


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _ref(x, k, strides, pads):
  return lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _assert_close(a, b, rtol=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(1.0, np.abs(b).max()))


XOR_CONVS = [  # (x shape, kernel shape, stride, pad): channels off and on word/vector sizes
    ((2, 9, 8, 3), (3, 3, 3, 5), 1, 1),
    ((2, 16, 16, 64), (3, 3, 64, 64), 1, 1),
    ((2, 15, 15, 40), (3, 3, 40, 70), 2, 1),
    ((1, 7, 7, 128), (3, 3, 128, 128), 1, 1),
    ((2, 6, 5, 33), (3, 3, 33, 7), 1, 0),
    ((2, 8, 8, 4), (1, 1, 4, 8), 2, 0),
]


needs_xor = pytest.mark.skipif(jax.default_backend() == "cpu" and not xor.available(),
                               reason="the C++ XOR kernel is not built here (needs g++)")


@needs_xor
@pytest.mark.parametrize("x_shape,k_shape,stride,pad", XOR_CONVS)
def test_xor_conv_equals_the_f32_conv_and_the_jax_xor_kernel(x_shape, k_shape, stride, pad):
  from bireal_jax import quantizers
  xq = jnp.where(_rand(x_shape, 5) >= 0, 1.0, -1.0)
  wq = quantizers.magnitude_aware_sign(_rand(k_shape, 6))
  strides, pads = (stride, stride), ((pad, pad), (pad, pad))
  kernel = jax.jit(lambda a, b: xor.xor_conv(a, b, stride, pad))
  # Exact integers times α: the f32 convolution of the same operands agrees to its rounding.
  _assert_close(kernel(xq, wq), _ref(xq, wq, strides, pads))
  # Bit for bit the pure-JAX kernel, also for ±0 entries (bit 0, i.e. +1, in both).
  wq = wq.at[0, 0, 0].set(0.0 * wq[0, 0, 0])
  np.testing.assert_array_equal(kernel(xq, wq), binconv.xor_jax(xq, wq, strides, pads))


@needs_xor
def test_xor_conv_lowers_to_its_custom_call_and_rejects_bad_input():
  xq, wq = jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
  assert "bireal_xor_conv_fwd" in jax.jit(
      lambda a, b: xor.xor_conv(a, b, 1, 1)).lower(xq, wq).as_text()
  with pytest.raises(ValueError, match="matching channels"):
    xor.xor_conv(xq, jnp.ones((3, 3, 2, 4)), 1, 1)
  with pytest.raises(ValueError, match="does not fit"):
    xor.xor_conv(xq, jnp.ones((7, 7, 3, 4)), 1, 0)
