"""One path layer for every file the library and the job touch: a local path or an object-store
URL (`gs://bucket/run`, or any scheme `etils.epath` handles), as Orbax takes them.

    from bireal_jax import storage
    wd = storage.path("gs://bucket/run")       # epath.Path; a local path stays local
    storage.write_text(wd / "config.json", s)  # atomic: tmp + rename locally, one object upload

A URL is never turned into a local path (`os.path.abspath("gs://b/x")` is `<cwd>/gs:/b/x`): a
local path is made absolute, a URL kept as it is. A scheme whose filesystem package is missing
is an error naming the package (`MissingBackend`). Which errors of a store are passing ones
(connection refused, timeouts, HTTP 429/5xx) is decided once here (`is_transient`), so that a
restore never takes a network error for a damaged checkpoint.
"""
from __future__ import annotations

import errno
import importlib.util
import logging
import os
import re
import time
import uuid
from typing import Callable, Optional, TypeVar, Union

from etils import epath

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
T = TypeVar("T")

# scheme -> (module epath's fsspec backend needs, pip requirement naming it)
_FSSPEC_PACKAGES = {"gs": ("gcsfs", "bireal_jax[gcs]  (gcsfs)"),
                    "s3": ("s3fs", "s3fs"),
                    "az": ("adlfs", "adlfs")}


class MissingBackend(ImportError):
  """A URL whose filesystem package is not installed."""


def is_url(p: PathLike) -> bool:
  """True for `scheme://...` (gs://, s3://, ...), False for a local path."""
  return "://" in os.fspath(p)


def scheme(p: PathLike) -> Optional[str]:
  s = os.fspath(p)
  return s.split("://", 1)[0] if "://" in s else None


def uses_tensorflow_io(p: PathLike) -> bool:
  """Whether epath reaches this URL through `tf.io.gfile` (TensorFlow installed and
  EPATH_USE_TF not false, as epath decides) rather than fsspec."""
  if os.environ.get("EPATH_USE_TF", "").lower() in ("false", "no", "f", "0"):
    return False
  return importlib.util.find_spec("tensorflow") is not None


def require_backend(p: PathLike) -> None:
  """Raise `MissingBackend` naming the package to install when `p`'s scheme cannot be reached."""
  s = scheme(p)
  if s is None:
    return
  if s not in _FSSPEC_PACKAGES and s != "hf":
    raise MissingBackend(f"{os.fspath(p)!r}: the scheme {s}:// is not supported; expected a "
                         f"local path or one of {', '.join(k + '://' for k in _FSSPEC_PACKAGES)}")
  module, requirement = _FSSPEC_PACKAGES.get(s, ("huggingface_hub", "huggingface_hub"))
  if uses_tensorflow_io(p) and s in ("gs", "s3"):
    return  # tf.io.gfile has them built in
  if importlib.util.find_spec(module) is None:
    raise MissingBackend(f"{os.fspath(p)!r} needs the package {module!r}, which is not "
                         f"installed: pip install '{requirement}'")


def path(p: PathLike) -> epath.Path:
  """`p` as an `epath.Path`: an absolute local path, or the URL as it is (its backend checked)."""
  if isinstance(p, epath.Path) and is_url(p):
    return p
  s = os.fspath(p)
  if is_url(s):
    require_backend(s)
    return epath.Path(s)
  return epath.Path(os.path.abspath(s))


def join(p: PathLike, *parts: str) -> str:
  """`p/parts...` as a string (URLs kept as URLs)."""
  return os.fspath(path(p).joinpath(*parts))


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def write_text(p: PathLike, text: str) -> None:
  """Write `text` whole: locally to a temporary file renamed over `p` (a crash leaves the old
  file or the new one); on object storage as one upload (objects appear whole)."""
  target = path(p)
  if is_url(target):
    target.write_text(text)
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.write_text(text)
  os.replace(tmp, target)


def makedirs(p: PathLike) -> None:
  """Create a local directory (and parents); nothing on object storage (prefixes need none)."""
  if not is_url(p):
    os.makedirs(os.fspath(path(p)), exist_ok=True)


def listdir(p: PathLike) -> list[str]:
  """Names in the directory `p` (sorted); [] when it does not exist."""
  d = path(p)
  return sorted(c.name for c in d.iterdir()) if d.is_dir() else []


def size_of(p: PathLike) -> int:
  """Bytes of the files under `p` (0 when unknown)."""
  root = path(p)
  if not is_url(root):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
  total, folders = 0, [root]  # (epath's walk() yields URLs without their scheme)
  try:
    while folders:
      for child in folders.pop().iterdir():
        if child.is_dir():
          folders.append(child)
        else:
          total += child.stat().length
  except OSError:
    return 0
  return total


# ---------------------------------------------------------------------------------------------
# Passing errors
# ---------------------------------------------------------------------------------------------

_TRANSIENT_TEXT = re.compile(
    r"connection (refused|reset|aborted)|cannot connect to host|connect call failed|"
    r"timed? ?out|temporarily unavailable|service unavailable|too many requests|"
    r"(http|status|code)[^0-9/]{0,12}(429|5\d\d)\b|\bUNAVAILABLE\b|DEADLINE_EXCEEDED|broken pipe|"
    r"remote end closed|server disconnected|name or service not known|"
    r"temporary failure in name resolution", re.IGNORECASE)
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE, errno.EAGAIN}


def is_transient(e: BaseException) -> bool:
  """Whether `e` (or an error in its chain) is a passing storage error: the network, a
  timeout, a throttle or a server error (HTTP 429/5xx), rather than data that is wrong."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (ConnectionError, TimeoutError)):
      return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
      return True
    code = getattr(e, "code", None) if not isinstance(e, OSError) else None
    if isinstance(code, int) and (code == 429 or 500 <= code < 600):
      return True
    if type(e).__module__.startswith("aiohttp") and "Connect" in type(e).__name__:
      return True
    if _TRANSIENT_TEXT.search(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


class StorageUnavailable(RuntimeError):
  """Storage kept failing with passing errors after the retries: nothing was changed."""


def retry(fn: Callable[[], T], *, what: str, where: PathLike, retries: int = 3,
          first_wait_s: float = 5.0, say: Callable[[str], None] = log.warning) -> T:
  """`fn()`, retried with exponential backoff while it fails with passing errors
  (`is_transient`); after `retries` retries `StorageUnavailable` names `where` and the error.
  Other errors propagate at once."""
  for attempt in range(retries + 1):
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - classified below
      if not is_transient(e):
        raise
      if attempt == retries:
        raise StorageUnavailable(
            f"{what} failed: {os.fspath(where)} could not be reached after {retries + 1} "
            f"attempt(s) ({type(e).__name__}: {short(e)}). Nothing was changed there: check "
            f"the connection and credentials, then run the same command again.") from e
      wait = first_wait_s * 2 ** attempt
      say(f"{what}: {os.fspath(where)} unreachable ({type(e).__name__}: "
          f"{short(e, 120)}); retrying in {wait:.0f} s")
      time.sleep(wait)
  raise AssertionError("unreachable")


def short(e: BaseException, n: int = 300) -> str:
  s = str(e).replace("\n", " ")
  return s if len(s) <= n else s[:n] + "..."
