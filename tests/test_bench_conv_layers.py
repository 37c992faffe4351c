"""experiments/bench_conv_layers.py reads the model's convolutions from the model itself."""
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import bench_conv_layers as bcl  # noqa: E402

from bireal_jax.ops.cpu import onednn  # noqa: E402


def test_model_convs_lists_every_convolution_of_bireal18():
  convs = bcl.model_convs("bireal18", batch=2, size=32, num_classes=10)
  # 1 stem + 16 binary 3x3 + 3 real 1x1 downsample convolutions.
  assert sum(convs.values()) == 20
  stem = [k for k in convs if k[0][3] == 3]
  assert stem == [((2, 32, 32, 3), (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3)))]
  assert sum(c for k, c in convs.items() if k[1][:2] == (3, 3)) == 16
  assert sum(c for k, c in convs.items() if k[1][:2] == (1, 1)) == 3


@pytest.mark.parametrize("impl", ["xla", pytest.param("onednn", marks=pytest.mark.skipif(
    jax.default_backend() != "cpu" or not onednn.available(),
    reason="oneDNN convolutions are CPU-only and need g++ + libdnnl-dev (make sysdeps)"))])
def test_conv_programs_compute_the_gradients_of_the_convolution(impl):
  (lhs, rhs, strides, padding), = [k for k in bcl.model_convs("bireal18", 2, 32, 10)
                                   if k[1][:2] == (3, 3) and k[2] == (2, 2)][:1]
  progs = bcl.conv_programs(lhs, rhs, strides, padding, {}, stem=False, impl=impl)
  assert ("bireal_onednn" in progs["fwd"][0].as_text()) == (impl == "onednn")
  assert set(progs) == {"fwd", "dX", "dW"}
  (c, (x, w, g), flops) = progs["dW"]
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding,
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  want = jax.grad(lambda w: (conv(x, w) * g).sum())(w)
  np.testing.assert_allclose(c(x, w, g), want, rtol=1e-4, atol=1e-3)
  assert flops == 2 * g.size * rhs[0] * rhs[1] * rhs[2]
  assert "dX" not in bcl.conv_programs(lhs, rhs, strides, padding, {}, stem=True)
  with pytest.raises(ValueError, match="unknown impl"):
    bcl.conv_programs(lhs, rhs, strides, padding, {}, stem=False, impl="cudnn")


def test_library_split_sees_the_cpu_options_keep_convolutions_on_eigen():
  (lhs, rhs, strides, padding), = [k for k in bcl.model_convs("bireal18", 2, 32, 10)
                                   if k[1][:2] == (3, 3) and k[2] == (1, 1)][:1]
  from bireal_jax import ops
  cpu = bcl.conv_programs(lhs, rhs, strides, padding, ops.compiler_options(), stem=False)
  assert bcl.library_split(cpu["fwd"][0]) == (1, 0)
  default = bcl.conv_programs(lhs, rhs, strides, padding, {}, stem=False)
  assert sum(bcl.library_split(default["fwd"][0])) == 1
