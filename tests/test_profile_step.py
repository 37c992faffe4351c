"""experiments/profile_step.py: the trace it reads adds up to the step, grouped by XLA op."""
import os
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import profile_step as ps  # noqa: E402

from bireal_jax.ops.cpu import onednn  # noqa: E402


def test_hlo_index_reads_names_types_and_opcodes():
  text = ("  %ffi_call.3 = f32[2,4,4,8]{3,2,1,0} custom-call(%p0, %p1), custom_call_target=\"x\"\n"
          "  ROOT %add_fusion = f32[8]{0} fusion(%a), kind=kLoop, calls=%c\n")
  assert ps.hlo_index(text) == {"ffi_call.3": ("f32[2,4,4,8]", "custom-call", "x"),
                                "add_fusion": ("f32[8]", "fusion", "")}
  assert ps.op_kind("ffi_call.3", "custom-call", "x") == "custom calls: other"
  assert ps.op_kind("ffi_call.4", "custom-call",
                    "bireal_onednn_conv_bwd_data") == "custom calls: oneDNN convolutions"
  assert ps.op_kind("ffi_call.5", "custom-call",
                    "bireal_xor_conv_fwd") == ps.CUSTOM_CALLS["bireal_xor_conv"]
  assert ps.op_kind("ynn_fusion.2", "fusion").startswith("library")
  assert ps.op_kind("convolution.1", "convolution") == "XLA convolutions"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the kinds are XLA:CPU's thunks")
@pytest.mark.parametrize("paths", ["native", "ref"])
def test_profile_of_a_tiny_step_groups_its_ops(paths, capsys):
  ps.main(["--image-size", "32", "--batch-size", "2", "--num-classes", "10", "--repeats", "1",
           "--paths", paths])
  out = capsys.readouterr().out
  assert "| kind | ms per step | share |" in out and "XLA loop fusions" in out
  # The native step's convolutions are oneDNN custom calls; the reference step's are XLA's.
  if paths == "ref":
    assert "| XLA convolutions |" in out and "custom calls" not in out
  elif onednn.available():
    assert "| custom calls: oneDNN convolutions |" in out and "XLA convolutions" not in out
    assert "| custom calls: oneDNN max-pool |" in out
    assert "| custom calls: C++ XOR binary-conv forward |" in out
