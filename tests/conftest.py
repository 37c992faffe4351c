"""Test-wide settings, applied before JAX or bireal_jax is imported by any test module.

The suite runs the models with the `native` preset of `bireal_jax.ops` (the C++ kernels wherever
they apply, else the pure-JAX rewrites): every test then exercises the CPU kernels, and none
spends its time in `auto`'s timing of throwaway tiny shapes. `tests/test_ops.py` tests `auto`
itself, with its own cache directory. Set BIREAL_OPS before pytest to run the suite otherwise.
"""
import os

os.environ.setdefault("BIREAL_OPS", "native")
