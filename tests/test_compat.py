"""bireal_jax.compat: each private API of another library that we use, on the installed versions."""
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_distributed_kv_client_passes_a_string_between_processes():
  """Before jax.distributed.initialize: a clear CompatError. After (a one-process job on
  127.0.0.1): the client sets and reads back a key, as the workdir lock's verdict travels."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  code = f"""
import jax
from bireal_jax import compat
try:
  compat.distributed_kv_client()
  raise SystemExit("no error before initialize")
except compat.CompatError as e:
  assert "jax.distributed.initialize() to have run" in str(e), e
jax.distributed.initialize("127.0.0.1:{port}", num_processes=1, process_id=0)
client = compat.distributed_kv_client()
client.key_value_set("bireal_jax_test", "v-verdict")
print("GOT", client.blocking_key_value_get("bireal_jax_test", 10_000))
jax.distributed.shutdown()
"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                     timeout=120, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "GOT v-verdict" in r.stdout
