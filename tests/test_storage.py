"""bireal_jax.storage (the path layer, passing-error classification, retries) and
checkpoint.is_damage on real Orbax errors."""
import errno
import importlib.util
import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from bireal_jax import checkpoint, storage


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
  assert storage.join("runs/a", "config.json") == str(tmp_path / "runs" / "a" / "config.json")
  assert storage.is_url("gs://b/x") and not storage.is_url("gs:/b/x")
  assert storage.scheme("s3://b/x") == "s3" and storage.scheme("/tmp/x") is None


def test_missing_or_unknown_filesystem_is_named():
  with pytest.raises(storage.MissingBackend, match=r"ftp:// is not supported; expected a local "
                                                   r"path or one of gs://"):
    storage.path("ftp://host/run")
  if importlib.util.find_spec("s3fs") is None:
    os.environ["EPATH_USE_TF"] = "false"
    try:
      with pytest.raises(storage.MissingBackend, match=r"'s3://b/run' needs the package "
                                                       r"'s3fs'.*pip install 's3fs'"):
        storage.path("s3://b/run")
    finally:
      del os.environ["EPATH_USE_TF"]


def test_write_text_replaces_whole_and_leaves_no_temporary_file(tmp_path):
  p = tmp_path / "sub" / "config.json"
  storage.write_text(str(p), "one")
  storage.write_text(str(p), "two")
  assert p.read_text() == "two"
  assert os.listdir(p.parent) == ["config.json"]
  assert storage.listdir(str(tmp_path / "nope")) == []
  assert storage.size_of(str(tmp_path)) == 3


def test_passing_errors_are_told_from_wrong_data():
  from google.api_core import exceptions as gexc
  transient = [ConnectionRefusedError(errno.ECONNREFUSED, "refused"), TimeoutError("slow"),
               OSError(errno.ECONNRESET, "reset"), gexc.ServiceUnavailable("down"),
               gexc.TooManyRequests("slow down"), ValueError("UNAVAILABLE: Connection reset"),
               RuntimeError("GET .../o/x failed with status 503")]
  for e in transient:
    assert storage.is_transient(e), e
  chained = ValueError("wrapped")
  chained.__cause__ = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
  assert storage.is_transient(chained)
  wrong = [ValueError("DATA_LOSS: Error decoding manifest of gs://b/run/checkpoints/500/state"),
           json.JSONDecodeError("Expecting value", "x", 0), FileNotFoundError("x"),
           MemoryError(), gexc.NotFound("no such object"), KeyError("params")]
  for e in wrong:
    assert not storage.is_transient(e), e


def test_retry_backs_off_on_passing_errors_only():
  calls, said = [], []

  def flaky():
    calls.append(1)
    if len(calls) < 3:
      raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    return "ok"

  assert storage.retry(flaky, what="listing", where="gs://b/x", retries=3, first_wait_s=0.01,
                       say=said.append) == "ok"
  assert len(calls) == 3 and len(said) == 2 and "gs://b/x unreachable" in said[0]

  def broken():
    raise ValueError("DATA_LOSS: bad")

  with pytest.raises(ValueError, match="DATA_LOSS"):
    storage.retry(broken, what="x", where="gs://b/x", retries=3, first_wait_s=0.01,
                  say=said.append)

  def down():
    raise TimeoutError("no answer")

  with pytest.raises(storage.StorageUnavailable,
                     match=r"restoring failed: gs://b/x could not be reached after 2 attempt"):
    storage.retry(down, what="restoring", where="gs://b/x", retries=1, first_wait_s=0.01,
                  say=said.append)


def _orbax_error(fn):
  try:
    fn()
  except Exception as e:  # noqa: BLE001 - the error is the result
    return e
  raise AssertionError("expected an error")


def test_is_damage_on_real_orbax_errors_and_not_on_others(tmp_path):
  d = tmp_path / "ck"
  with ocp.CheckpointManager(d, item_names=("state",)) as m:
    for step in (1, 2, 3):
      m.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"w": np.arange(100.)})))
    m.wait_until_finished()
  for root, _, files in os.walk(d / "3" / "state"):  # truncated data files
    for f in files:
      if f not in ("_METADATA", "_CHECKPOINT_METADATA", "commit_success.txt"):
        p = os.path.join(root, f)
        os.truncate(p, os.path.getsize(p) // 3)
  (d / "2" / "state" / "_METADATA").write_text("garbage{")  # unparsable metadata
  args = ocp.args.Composite(state=ocp.args.PyTreeRestore(item={"w": np.zeros(100)}))
  with ocp.CheckpointManager(d, item_names=("state",)) as m:
    for step in (3, 2):
      e = _orbax_error(lambda: m.restore(step, args=args))
      assert checkpoint.is_damage(e), (step, type(e), e)
    m.restore(1, args=args)
  assert not checkpoint.is_damage(MemoryError())
  assert not checkpoint.is_damage(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
  assert not checkpoint.is_damage(ValueError("UNAVAILABLE: NOT_FOUND-looking text"))
