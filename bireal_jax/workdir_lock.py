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
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Optional

LOCK_FILE = "workdir.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_BREAK_STALE_S = 60.0  # a takeover takes milliseconds; an older .break file is a dead breaker


class WorkdirLockError(RuntimeError):
  """The workdir's lock cannot be taken: held by a live job, or the workdir is unwritable."""


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
    self._stop = threading.Event()
    self._on_lost = on_lost or _stop_process
    self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                    name="workdir-lock-heartbeat")
    self._thread.start()

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
        self._on_lost(f"error: the workdir lock {self.path} is now held by {who}: this job's "
                      f"heartbeat was taken for a dead job's. Stopping so that two jobs do not "
                      f"write one workdir.")
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
      print(f"WARNING: could not remove the workdir lock {self.path}: {e}", file=sys.stderr,
            flush=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def _stop_process(msg: str):
  print(msg, file=sys.stderr, flush=True)
  os._exit(1)  # from the heartbeat thread: nothing else stops the training loop in time


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


def acquire(workdir: str, *, job: str = "", stale_after_s: float = STALE_AFTER_S,
            heartbeat_s: float = HEARTBEAT_S, say: Callable[[str], None] = print,
            on_lost: Optional[Callable[[str], None]] = None) -> WorkdirLock:
  """Take `workdir`'s lock (creating the workdir), taking over a dead job's; else raise."""
  path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  except OSError as e:
    raise WorkdirLockError(f"cannot create workdir {workdir!r} ({e.strerror}): expected a "
                           f"writable directory") from e
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time(),
            "job": job, "boot_id": _boot_id(), "pid_ns": _pid_namespace(),
            "pid_start": _process_start(os.getpid()), "token": uuid.uuid4().hex}
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
      who = describe(other) if other else "an unreadable record"
      raise WorkdirLockError(
          f"workdir {workdir!r} is in use by another job: its lock {path} is held by {who}, "
          f"heartbeat {time.time() - mtime:.0f} s ago. Expected no live holder: stop that job "
          f"or use another --workdir. (A dead holder's lock is taken over: on this host when "
          f"its pid is gone, from another host when its heartbeat is older than "
          f"{stale_after_s:.0f} s; delete the file only if you are sure that job is gone.)")
    if _break(path, ino, mtime):
      say(f"WARNING: took over the workdir lock {path} from a dead job "
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
