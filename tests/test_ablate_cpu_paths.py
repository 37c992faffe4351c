"""experiments/ablate_cpu_paths.py: each variant really undoes its one path, and the script runs."""
import os
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import ablate_cpu_paths as ab  # noqa: E402

from bireal_jax import models, ops  # noqa: E402
from bireal_jax.ops.cpu import onednn, xor  # noqa: E402

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="the ablated paths are CPU-only by design")


def _forward_jaxpr(variant: str) -> str:
  model = models.get("bireal18", num_classes=5, base_width=8)
  x = jnp.ones((2, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)  # tracing needs shapes only
  with ops.implementation(ab.VARIANTS[variant]):
    return str(jax.make_jaxpr(lambda v, a: model.apply(v, a, train=True,
                                                       mutable=["batch_stats"]))(variables, x))


def test_each_variant_undoes_only_its_path():
  shipped = _forward_jaxpr("shipped")
  assert "custom_vjp_call" in shipped  # the BatchNorm backward (and the binary convs')
  flax_bn = _forward_jaxpr("flax_bn")
  assert shipped.count("custom_vjp_call") > flax_bn.count("custom_vjp_call")
  if not (onednn.available() and xor.available()):
    pytest.skip("the C++ custom calls are unavailable here (no g++ / libdnnl-dev)")
  for text in (shipped, flax_bn):
    assert "bireal_onednn_pool_fwd" in text and "bireal_xor_conv_fwd" in text
  sliced = _forward_jaxpr("sliced_pool")
  assert "bireal_onednn_pool_fwd" not in sliced and "bireal_xor_conv_fwd" in sliced
  jax_xor = _forward_jaxpr("jax_xor")
  assert "bireal_xor_conv_fwd" not in jax_xor and "population_count" in jax_xor
  assert "bireal_onednn_pool_fwd" in jax_xor


def test_script_prints_one_row_per_variant(capsys):
  for kind in ("train", "eval"):
    ab.main(["--image-size", "32", "--batch-size", "2", "--num-classes", "10", "--repeats", "1",
             "--kind", kind, "--variants", "shipped,flax_bn"])
    out = capsys.readouterr().out
    assert f"  {kind}  model" in out
    assert "| shipped |" in out and "| flax_bn |" in out and "1.000×" in out
  with pytest.raises(SystemExit):
    ab.main(["--variants", "shipped,nope"])
