"""bireal_jax/host_malloc.py: glibc keeps freed memory, so re-allocating a large block faults no
pages in again; `BIREAL_MALLOC=system` leaves malloc alone. Each case in its own process, so the
test session's own allocator is untouched."""
import os
import subprocess
import sys

import pytest

_PROBE = r"""
import ctypes, resource, sys
from bireal_jax.ops.cpu import host_malloc
applied = host_malloc.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20

def touch_and_free():
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)  # first touch: every page faults in unless malloc kept it
  libc.free(p)

touch_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  touch_and_free()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(env_malloc):
  env = dict(os.environ, BIREAL_MALLOC=env_malloc)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc/Linux only")
def test_keep_freed_memory_stops_page_faults_of_reused_blocks():
  applied, faults = _probe("keep")
  if not applied:
    pytest.skip("not glibc: keep_freed_memory() changes nothing here")
  system_applied, system_faults = _probe("system")
  assert not system_applied
  pages = 10 * (64 << 20) // 4096
  assert system_faults > pages // 2  # glibc unmaps a freed 64 MB block; the next one faults in
  assert faults < pages // 100  # kept: the same pages are reused
