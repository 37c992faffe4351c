"""Split grammar ("train", "validation[:1000]", "train[90%:]"), per-process shards and the
index ranges that leave out the images that do not decode. Plain Python, no TensorFlow."""
from __future__ import annotations

import math
import re




_SPLIT_RE = re.compile(r"^\s*(\w+)\s*(?:\[\s*(-?[\d_]+%?)?\s*:\s*(-?[\d_]+%?)?\s*\])?\s*$")


def resolve_split(spec: str, sizes: dict[str, int]) -> tuple[str, int, int]:
  """`"name"` or `"name[from:to]"` (ints, negative ints or percents, as tfds) -> (name, a, b)."""
  m = _SPLIT_RE.match(str(spec))
  if not m:
    raise ValueError(f"split {spec!r} not understood; expected 'name' or 'name[from:to]' with "
                     "names from " + str(sorted(sizes)))
  name, lo, hi = m.groups()
  if name not in sizes:
    raise ValueError(f"unknown split {name!r} in {spec!r}; expected one of {sorted(sizes)}")
  n = sizes[name]

  def bound(v, default):
    if v is None:
      return default
    x = int(round(float(v[:-1]) * n / 100)) if v.endswith("%") else int(v)
    x = n + x if x < 0 else x
    if not 0 <= x <= n:
      raise ValueError(f"split {spec!r}: bound {v} outside the {n} examples of {name!r}")
    return x

  start, end = bound(lo, 0), bound(hi, n)
  if end < start:
    raise ValueError(f"split {spec!r} selects nothing (start {start} > end {end})")
  return name, start, end


def shard_range(start: int, end: int, index: int, count: int,
                drop_remainder: bool) -> tuple[int, int]:
  """Process `index`'s contiguous slice of [start, end), as tfds.even_splits."""
  n = end - start
  per, rem = divmod(n, count)
  if drop_remainder:
    a = start + per * index
    return a, a + per
  a = start + per * index + min(index, rem)
  return a, a + per + (index < rem)


def eval_batch_count(num_examples: int, count: int, batch_size: int) -> int:
  # The largest shard decides, so every process runs the same number of eval steps.
  return max(1, math.ceil(math.ceil(num_examples / count) / batch_size))


def good_ranges(start: int, end: int, bad, lo: int, hi: int) -> list[tuple[int, int]]:
  """[a, b) index ranges holding the lo-th to (hi-1)-th good image of [start, end).

  `bad`: sorted indices left out. With none, this is [(start + lo, start + hi)].
  """
  out, seen, a = [], 0, start
  for stop in [*(i for i in bad if start <= i < end), end]:
    n = stop - a  # good images in [a, stop)
    x, y = max(lo - seen, 0), min(hi - seen, n)
    if x < y:
      out.append((a + x, a + y))
    seen, a = seen + n, stop + 1
  return out


def split_of(name: str, ranges, at: int) -> str:
  """tfds split string of index ranges ("train[0:5]+train[6:9]"), `name[at:at]` when empty."""
  return "+".join(f"{name}[{a}:{b}]" for a, b in ranges) if ranges else f"{name}[{at}:{at}]"
