"""Test helpers: running a function under an `ops.implementation` setting and telling which path
ran (tests/test_layers.py, test_models.py, test_ops.py: the layers, a model and the compiler
options on the CPU fast paths against the plain lax reference).

`fast`: True = the "native" preset (the C++ kernels wherever they apply), False = "reference"
(plain lax), else an `ops.implementation` setting itself ("jax": no custom calls).
"""
import jax
import optax
import pytest

from bireal_jax import ops

cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu",
                              reason="the fast paths are CPU-only by design")


def _setting(fast):
  """The `ops.implementation` setting that `fast` names."""
  if fast is True:
    return "native"
  return "reference" if fast is False else fast


def traced(fn, *args, fast):
  """Jaxpr text of `fn` traced with the fast paths on or off (or under a setting)."""
  with ops.implementation(_setting(fast)):
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args))  # fresh lambda: no trace-cache reuse


def conv_branch(jaxpr: str) -> str:
  """Which binary-conv forward a traced jaxpr took: packed XOR, int8 dot, or the f32 conv."""
  if "population_count" in jaxpr or "bireal_xor_conv_fwd" in jaxpr:  # JAX or C++ XOR kernel
    return "xor"
  return "int8" if "i8" in jaxpr else "f32"


def both(fn, *args, fast=True):
  """`fn(*args)` jitted once with the fast paths (or setting `fast`) and once with the
  reference paths."""
  out = []
  for f in (fast, False):
    with ops.implementation(_setting(f)):
      out.append(jax.jit(lambda *a: fn(*a))(*args))  # fresh lambda: no trace-cache sharing
  return out


def loss_and_grads(model, variables, images, labels):
  """Training-mode loss, parameter gradients and updated batch stats of a Linen model."""
  def loss_fn(params):
    logits, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                              images, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd
  (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
  return loss, grads, upd["batch_stats"]
