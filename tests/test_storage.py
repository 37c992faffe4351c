"""bireal_jax.storage (the path layer, passing-error classification, retries). (Damage vs passing
errors of real Orbax restores, `checkpoint.is_damage`: test_checkpoint.py.)"""
import errno
import importlib.util
import json
import os

import pytest

from bireal_jax import storage


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
