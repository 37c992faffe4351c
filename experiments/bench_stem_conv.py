"""The ImageNet stem conv (7×7/2, 3 → 64, 224²) as a C++ direct conv (`ops/cpu/stem.py`, tried
for issue 24 item 3 and not kept) against XLA's and oneDNN's, with `auto`'s timer; first checks
its values against XLA's f32 conv on a few geometries.

  .venv/bin/python experiments/bench_stem_conv.py t
"""
import os, sys, jax, jax.numpy as jnp, numpy as np
from jax import lax
os.environ["BIREAL_AUTOTUNE_ROUNDS"] = "11"
from bireal_jax import ops
from bireal_jax.ops import autotune
from bireal_jax.ops.cpu import stem
from bireal_jax.ops import Candidate
print(stem.available())
ops.CANDIDATES["conv2d"]["stem_cpp"] = Candidate(lambda x, w, strides, pads: stem.conv2d(x, w, strides, pads))
for c in ops.CANDIDATES["conv2d"].values(): c.available()
for shape, k, s, p in [((2,224,224,3),(7,7,3,64),(2,2),((3,3),(3,3))), ((1,11,10,3),(7,7,3,48),(2,2),((3,3),(3,3))), ((2,9,8,1),(3,3,1,16),(1,2),((0,2),(1,0))), ((1,5,5,3),(3,3,3,80),(1,1),((1,1),(1,1)))]:
  xx = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  ww = jnp.asarray(np.random.default_rng(1).standard_normal(k), jnp.float32)
  ref = lax.conv_general_dilated(np.asarray(xx, np.float64), np.asarray(ww, np.float64), s, p, dimension_numbers=("NHWC","HWIO","NHWC"))
  got = jax.jit(stem.conv2d, static_argnums=(2,3))(xx, ww, s, p)
  print(shape, float(np.abs(np.asarray(got) - np.asarray(ref)).max()), float(np.abs(np.asarray(ref)).max()))
if "t" in sys.argv:
  print("load", open("/proc/loadavg").read().split()[:3])
  st = dict(strides=(2,2), pads=((3,3),(3,3)))
  for n in (1, 2):
    x = jax.ShapeDtypeStruct((n,224,224,3), jnp.float32); w = jax.ShapeDtypeStruct((7,7,3,64), jnp.float32)
    t = autotune._time("conv2d", ["reference","onednn","stem_cpp"], (x,w), st, False)
    print(n, "  ".join(f"{k} {v*1e3:.3f}" for k,v in t.items()), flush=True)
  print("load", open("/proc/loadavg").read().split()[:3])
