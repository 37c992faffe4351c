"""One writer per workdir: a lock file, `WORKDIR/workdir.lock`, that names its holder.

A training job takes the lock before it builds data or compiles anything, refreshes it while it
runs (heartbeat) and removes it when it ends, normally or by an exception. A second job on the
same workdir is refused with the holder's host, pid and start time.

The rule (see docs/reliability.md):
  * Taking the lock is `open(O_CREAT | O_EXCL)`: atomic on local disks and on NFSv3+ (the
    server decides). flock/fcntl locks are not used: they are per host on GCS-fuse and other
    FUSE mounts, and on NFS they depend on the lock daemon; a plain file with a heartbeat
    behaves the same everywhere and tells the refused job who holds it.
  * A lock whose holder is dead is taken over:
      - same machine (hostname, boot id and pid namespace all equal): when the holder's pid is
        gone or now belongs to another process (its start time differs);
      - anywhere else: when the lock's mtime (its heartbeat, every `heartbeat_s`) is older
        than `stale_after_s`. Clocks of the hosts and the file server must agree to well
        under that.
  * A takeover first creates `workdir.lock.break` (O_EXCL), re-reads the lock and deletes it
    only when it is still the stale one, so two jobs taking over at once cannot both win.
  * A job whose lock was taken over (its heartbeat stalled past the timeout, e.g. a host cut
    off from the file server) stops at its next heartbeat rather than keep writing.
On GCS-fuse O_EXCL is checked against gcsfuse's own view of the bucket only, so two jobs
started within its stat-cache TTL on different hosts can both win: there the lock detects a
second job but cannot guarantee exclusion.

A `gs://` workdir gets the same rules with GCS's generation preconditions instead of file
operations (`ObjectLock`): the lock object is created only if absent (`ifGenerationMatch=0`),
each heartbeat overwrites it only if it is still the generation this job last wrote, a stale
lock is taken over by overwriting exactly the stale generation (so two jobs taking over at once
cannot both win), and the heartbeat age is the object's `updated` time (GCS's clock).

A job whose lock was lost does not exit from the heartbeat thread: `WorkdirLock.lost` says why,
and the training loop stops at its next step (`check()` raises `WorkdirLockLost`), letting the
checkpoint in flight finish and `finally` blocks run.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional

from bireal_jax import storage

log = logging.getLogger(__name__)

LOCK_FILE = "workdir.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_GCS_TIMEOUT_S = 20.0  # one request to GCS (the lock object is a few hundred bytes)
_BREAK_STALE_S = 60.0  # a takeover takes milliseconds; an older .break file is a dead breaker


class WorkdirLockError(RuntimeError):
  """The workdir's lock cannot be taken: held by a live job, or the workdir is unwritable."""


class WorkdirLockLost(RuntimeError):
  """This job's lock was taken over by another job: it must stop writing the workdir."""


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _pid_namespace() -> str:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return ""


def _process_start(pid: int) -> Optional[int]:
  """Start time of `pid` in clock ticks since boot (None when unknown): tells a reused pid."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name may hold spaces


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def _fmt_time(t: float) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def describe(holder: dict) -> str:
  return (f"host {holder.get('host')!r}, pid {holder.get('pid')}, started "
          f"{_fmt_time(holder['start']) if 'start' in holder else '?'}, job {holder.get('job')!r}")


class WorkdirLock:
  """A held lock; `release()` (or leaving the `with` block) removes it."""

  def __init__(self, path: str, holder: dict, heartbeat_s: float,
               on_lost: Optional[Callable[[str], None]]):
    self.path = path
    self.holder = holder
    self.lost: Optional[str] = None  # why the lock was lost (set by the heartbeat thread)
    self._stop = threading.Event()
    self._on_lost = on_lost
    self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                    name="workdir-lock-heartbeat")
    self._thread.start()

  def check(self):
    """Raise `WorkdirLockLost` once another job holds the workdir (called at each step)."""
    if self.lost is not None:
      raise WorkdirLockLost(self.lost)

  def _lose(self, msg: str):
    self.lost = msg
    if self._on_lost is not None:
      self._on_lost(msg)

  def _beat(self, every: float):
    while not self._stop.wait(every):
      try:
        current = _read(self.path)
      except OSError:
        continue  # a file-server hiccup is not a takeover; try again next beat
      if current is None or current[0].get("token") != self.holder["token"]:
        if self._stop.is_set():
          return
        who = describe(current[0]) if current else "nobody (the file was deleted)"
        self._lose(lost_message(self.path, who))
        return
      try:
        os.utime(self.path)  # mtime = now (server time on NFS): the heartbeat
      except OSError:
        pass

  def release(self):
    self._stop.set()
    try:
      current = _read(self.path)
      if current is not None and current[0].get("token") == self.holder["token"]:
        os.unlink(self.path)  # only our own lock: never a successor's
    except OSError as e:
      log.warning("could not remove the workdir lock %s: %s", self.path, e)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def lost_message(path: str, who: str) -> str:
  return (f"the workdir lock {path} is now held by {who}: this job's heartbeat was taken for "
          f"a dead job's. Stopping so that two jobs do not write one workdir.")


def _read(path: str) -> Optional[tuple[dict, float, int]]:
  """(holder record, mtime, inode) of the lock file; None when there is none.

  An unparsable record (a holder between create and write, or garbage) reads as {}.
  """
  try:
    with open(path) as f:
      st = os.fstat(f.fileno())
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(text)
    if not isinstance(holder, dict):
      holder = {}
  except ValueError:
    holder = {}
  return holder, st.st_mtime, st.st_ino


def stale_reason(holder: dict, mtime: float, stale_after_s: float,
                 now: Optional[float] = None) -> Optional[str]:
  """Why the lock of `holder` (heartbeat at `mtime`) belongs to a dead job; None if it may be live."""
  now = time.time() if now is None else now
  age = now - mtime
  same_machine = (holder.get("host") == socket.gethostname() and holder.get("boot_id")
                  and holder.get("boot_id") == _boot_id()
                  and holder.get("pid_ns") == _pid_namespace())
  pid = holder.get("pid")
  if same_machine and isinstance(pid, int):
    if not _pid_alive(pid):
      return f"its process {pid} on this host is gone"
    start = _process_start(pid)
    if holder.get("pid_start") is not None and start is not None and start != holder["pid_start"]:
      return f"pid {pid} on this host now belongs to another process"
    return None
  if age > stale_after_s:
    return (f"its heartbeat is {age:.0f} s old, more than {stale_after_s:.0f} s "
            f"(holder on another host or unreadable record)")
  return None


def holder_record(job: str = "") -> dict:
  """This process's lock record: host, pid, start, job, boot id, pid namespace, the pid's start
  time (together they tell a dead or reused pid on this host) and a fresh token."""
  return {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time(),
          "job": job, "boot_id": _boot_id(), "pid_ns": _pid_namespace(),
          "pid_start": _process_start(os.getpid()), "token": uuid.uuid4().hex}


def _in_use(workdir: str, path: str, other: dict, age_s: float, stale_after_s: float) -> str:
  who = describe(other) if other else "an unreadable record"
  return (f"workdir {workdir!r} is in use by another job: its lock {path} is held by {who}, "
          f"heartbeat {age_s:.0f} s ago. Expected no live holder: stop that job or use another "
          f"--workdir. (A dead holder's lock is taken over: on this host when its pid is gone, "
          f"from another host when its heartbeat is older than {stale_after_s:.0f} s; delete "
          f"the lock only if you are sure that job is gone.)")


def acquire(workdir: str, *, job: str = "", stale_after_s: float = STALE_AFTER_S,
            heartbeat_s: float = HEARTBEAT_S, say: Callable[[str], None] = log.warning,
            on_lost: Optional[Callable[[str], None]] = None):
  """Take `workdir`'s lock (creating a local workdir), taking over a dead job's; else raise.

  Returns a `WorkdirLock` (local) or `ObjectLock` (gs://); both have `release()`, `check()`
  and `lost`. `on_lost(message)` is also called when the lock is lost.
  """
  if storage.is_url(workdir):
    return ObjectLock.acquire(workdir, job=job, stale_after_s=stale_after_s,
                              heartbeat_s=heartbeat_s, say=say, on_lost=on_lost)
  path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  except OSError as e:
    raise WorkdirLockError(f"cannot create workdir {workdir!r} ({e.strerror}): expected a "
                           f"writable directory") from e
  holder = holder_record(job)
  for _ in range(20):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      pass
    except OSError as e:
      raise WorkdirLockError(f"cannot create the workdir lock {path} ({e.strerror}): expected "
                             f"a writable workdir") from e
    else:
      try:
        os.write(fd, json.dumps(holder, indent=1).encode() + b"\n")
        os.fsync(fd)
      except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise WorkdirLockError(f"cannot write the workdir lock {path} ({e.strerror}): "
                               f"expected a writable workdir with free space") from e
      os.close(fd)
      return WorkdirLock(path, holder, heartbeat_s, on_lost)

    current = _read(path)
    if current is None:
      continue  # released meanwhile
    other, mtime, ino = current
    if not other:  # perhaps a holder between its create and its write: look again
      time.sleep(0.5)
      current = _read(path)
      if current is None:
        continue
      other, mtime, ino = current
    reason = stale_reason(other, mtime, stale_after_s)
    if reason is None:
      raise WorkdirLockError(_in_use(workdir, path, other, time.time() - mtime,
                                     stale_after_s))
    if _break(path, ino, mtime):
      say(f"took over the workdir lock {path} from a dead job "
          f"({describe(other) if other else 'unreadable record'}): {reason}")
  raise WorkdirLockError(f"could not take the workdir lock {path}: other jobs keep taking "
                         f"and dropping it")


def _break(path: str, ino: int, mtime: float) -> bool:
  """Delete the stale lock (inode `ino`, mtime `mtime`) unless it changed; True if deleted."""
  breaker = path + ".break"
  try:
    fd = os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    try:
      if time.time() - os.stat(breaker).st_mtime > _BREAK_STALE_S:
        os.unlink(breaker)
    except OSError:
      pass
    time.sleep(0.2)  # another job is taking over: look again
    return False
  try:
    current = _read(path)
    # The same file, not refreshed: nobody took it over (or beat it) since we judged it.
    if current is not None and current[2] == ino and current[1] == mtime:
      os.unlink(path)
      return True
    return False
  finally:
    os.close(fd)
    os.unlink(breaker)


# ---------------------------------------------------------------------------------------------
# gs:// workdirs: the same lock with GCS generation preconditions
# ---------------------------------------------------------------------------------------------


def _gcs_client():
  try:
    from google.cloud import storage as gcs
  except ImportError as e:
    raise storage.MissingBackend(
        "a gs:// workdir's lock needs the package 'google-cloud-storage', which is not "
        "installed: pip install 'bireal_jax[gcs]'") from e
  return gcs.Client()


class ObjectLock:
  """The workdir lock as a GCS object: `acquire` it; `release()`, `check()`, `lost` as
  `WorkdirLock`. Every write is conditional on the object's generation (see the module doc)."""

  def __init__(self, url: str, blob, holder: dict, generation: int, heartbeat_s: float,
               on_lost: Optional[Callable[[str], None]]):
    self.path = url
    self.holder = holder
    self.lost: Optional[str] = None
    self._blob, self._generation = blob, generation
    self._on_lost = on_lost
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                    name="workdir-lock-heartbeat")
    self._thread.start()

  check, _lose = WorkdirLock.check, WorkdirLock._lose
  __enter__, __exit__ = WorkdirLock.__enter__, WorkdirLock.__exit__

  @classmethod
  def acquire(cls, workdir: str, *, job: str, stale_after_s: float, heartbeat_s: float,
              say: Callable[[str], None], on_lost):
    from google.api_core import exceptions as gexc
    if storage.scheme(workdir) != "gs":
      raise WorkdirLockError(
          f"workdir {workdir!r}: a lock on {storage.scheme(workdir)}:// is not supported "
          f"(it needs conditional writes); expected a local path or a gs:// URL")
    url = storage.join(workdir, LOCK_FILE)
    bucket, name = url[len("gs://"):].split("/", 1)
    try:
      blob = _gcs_client().bucket(bucket).blob(name)
    except storage.MissingBackend as e:
      raise WorkdirLockError(str(e)) from e
    holder = holder_record(job)
    data = json.dumps(holder, indent=1)
    for _ in range(20):
      try:
        blob.upload_from_string(data, if_generation_match=0)  # only if absent
        return cls(url, blob, holder, blob.generation, heartbeat_s, on_lost)
      except gexc.PreconditionFailed:
        pass
      except Exception as e:  # noqa: BLE001 - a missing bucket, credentials, the network
        raise WorkdirLockError(f"cannot create the workdir lock {url} ({type(e).__name__}: "
                               f"{storage.short(e)}): expected a writable bucket") from e
      current = _read_object(blob.bucket, name)
      if current is None:
        continue  # released meanwhile
      other, updated, generation = current
      reason = stale_reason(other, updated, stale_after_s)
      if reason is None:
        raise WorkdirLockError(_in_use(workdir, url, other, time.time() - updated,
                                       stale_after_s))
      try:  # replace exactly the stale generation: of two jobs taking over, one wins
        blob.upload_from_string(data, if_generation_match=generation)
      except gexc.PreconditionFailed:
        continue
      say(f"took over the workdir lock {url} from a dead job "
          f"({describe(other) if other else 'unreadable record'}): {reason}")
      return cls(url, blob, holder, blob.generation, heartbeat_s, on_lost)
    raise WorkdirLockError(f"could not take the workdir lock {url}: other jobs keep taking "
                           f"and dropping it")

  def _beat(self, every: float):
    from google.api_core import exceptions as gexc
    data = json.dumps(self.holder, indent=1)
    while not self._stop.wait(every):
      try:  # no client-side retry loop: a failed beat is simply tried at the next one
        self._blob.upload_from_string(data, if_generation_match=self._generation,
                                      retry=None, timeout=_GCS_TIMEOUT_S)
        self._generation = self._blob.generation
      except gexc.PreconditionFailed:
        if self._stop.is_set():
          return
        try:
          current = _read_object(self._blob.bucket, self._blob.name)
        except Exception:  # noqa: BLE001 - the holder is unknown, the loss is not
          current = None
        who = describe(current[0]) if current else "nobody (the object was deleted)"
        self._lose(lost_message(self.path, who))
        return
      except Exception:  # noqa: BLE001 - a passing error is not a takeover: next beat
        continue

  def release(self):
    self._stop.set()
    self._thread.join(timeout=2 * _GCS_TIMEOUT_S)
    try:
      current = _read_object(self._blob.bucket, self._blob.name, retry=None)
      if current is not None and current[0].get("token") == self.holder["token"]:
        self._blob.delete(if_generation_match=current[2], retry=None,  # only our own lock
                          timeout=_GCS_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001
      log.warning("could not remove the workdir lock %s: %s", self.path, e)


def _read_object(bucket, name: str, **kw) -> Optional[tuple[dict, float, int]]:
  """(holder record, updated time, generation) of the lock object; None when there is none.
  `kw`: the client's `retry` (default: its own policy)."""
  blob = bucket.get_blob(name, timeout=_GCS_TIMEOUT_S, **kw)
  if blob is None:
    return None
  try:
    text = blob.download_as_bytes(if_generation_match=blob.generation,
                                  timeout=_GCS_TIMEOUT_S, **kw)
    holder = json.loads(text)
    if not isinstance(holder, dict):
      holder = {}
  except ValueError:
    holder = {}
  except Exception as e:  # noqa: BLE001
    from google.api_core import exceptions as gexc
    if isinstance(e, (gexc.NotFound, gexc.PreconditionFailed)):
      return _read_object(bucket, name, **kw)  # replaced or removed between the two calls
    raise
  return holder, blob.updated.timestamp(), blob.generation
