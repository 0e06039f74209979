"""Helpers shared by the benchmark scripts: timing, device description, result files, command-line lists."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")   # the committed records (read back by resumes, rechecks)


def device_name() -> str:
  d = jax.devices()[0]
  return getattr(d, "device_kind", d.platform).replace(" ", "_")


def device_tag() -> str:
  """The device in result file names (every bench's `<name>_<tag>.json`): h100, h200, a100, else the backend
  (cpu, gpu, tpu)."""
  kind = device_name().lower()
  for tag in ("h100", "h200", "a100"):
    if tag in kind:
      return tag
  return jax.default_backend()


def median_ms(fn, *args, warmup: int = 3, iters: int = 20, inner: int = 1, min_sample_ms: float = 0.0) -> float:
  """Median wall time of fn(*args) in ms over `iters` samples, each the mean of `inner` back-to-back calls
  (amortizing dispatch) synchronized with block_until_ready, after `warmup` calls.

  With `min_sample_ms`, `inner` is raised until one sample takes at least that long. The synchronization at
  the end of a sample costs ~0.1-0.2 ms on the GPU machine, which a few calls do not amortize: a 0.28 ms
  forward read 0.46 / 0.33 / 0.29 / 0.28 ms with 1 / 5 / 20 / 50 calls per sample (H100, 2026-11-22)."""
  def sample(n: int) -> float:
    """ms per call over n back-to-back calls, ended by one synchronization."""
    t0 = time.perf_counter()
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) * 1e3 / n

  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  if min_sample_ms > 0:
    inner = min(1000, max(inner, math.ceil(min_sample_ms / sample(inner))))
  return float(np.median([sample(inner) for _ in range(iters)]))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def write_results(records: list[dict], name: str, out_dir: str | None = None) -> str:
  """Write records (each stamped with device and jax version) to <out_dir>/<name>_<device>.json."""
  out_dir = out_dir or os.environ.get("OUT") or "benchmarks/results"
  os.makedirs(out_dir, exist_ok=True)
  for r in records:
    r.setdefault("device", device_name())
    r.setdefault("jax", jax.__version__)
  return write_json(os.path.join(out_dir, f"{name}_{device_tag()}.json"), records)


def write_json(path: str, obj) -> str:
  """Writes `obj` as JSON to `path` through a temporary file and a rename (`train.files.write_json`): a process
  killed mid-write (a device call cut by its time limit) leaves the previous file whole, never a truncated one
  that a resume cannot read."""
  from bmojo_jax.train import files  # pylint: disable=g-import-not-at-top
  return files.write_json(path, obj, indent=1)


def save_figure(fig, path: str, dpi: int = 120) -> str:
  """Lays out `fig`, writes it to `path` and closes it (the benchmarks' figures); returns path."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def ints(text: str) -> list[int]:
  """'1,2,4' -> [1, 2, 4] (a command-line list)."""
  return [int(x) for x in text.split(",") if x.strip()]


def append_results(records: list[dict], path: str) -> str:
  """Appends records to the JSON list at `path` (created, with its folder, when absent); returns path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  previous = []
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
  return write_json(path, previous + records)


def apply_overrides(config, items) -> None:
  """`section.field=value` overrides of an ml_collections ConfigDict, each cast to the field's type (bool:
  1/true, anything else false; a None field: int)."""
  for item in items:
    key, _, value = item.partition("=")
    *path, leaf = key.split(".")
    node = config
    for part in path:
      node = node[part]
    old = node[leaf]
    if isinstance(old, bool):
      node[leaf] = value.lower() in ("1", "true")
    else:
      node[leaf] = type(old)(value) if old is not None else int(value)


def parse_mesh(spec: str) -> dict[str, int]:
  """A --mesh / --meshes entry: "1" -> one device; "data=2", "fsdp=2:tensor=2" -> {axis: size} (the other axes 1)."""
  from bmojo_jax.train.sharding import MESH_AXES  # pylint: disable=g-import-not-at-top
  if spec == "1":
    return {}
  mesh = {}
  for part in spec.split(":"):
    axis, _, size = part.partition("=")
    if axis not in MESH_AXES or not size.isdigit():
      raise ValueError(f"--meshes entry {spec!r}: expected 1 or axis=size[:axis=size] with axes {MESH_AXES}")
    mesh[axis] = int(size)
  return mesh


class RowSchedule:
  """Which rows a resumable benchmark run measures, rows being records told apart by `key_fields`: with
  `resume`, not those the file at `path` already holds measured (without "skipped"); none once `budget_s`
  seconds have passed since `t0` (those are kept in `left_out`, by their key fields)."""

  def __init__(self, key_fields: tuple[str, ...], path: str, resume: bool, budget_s: float | None, t0: float):
    self.key_fields, self.path, self.budget_s, self.t0, self.left_out = key_fields, path, budget_s, t0, []
    self.done = {self.key(r) for r in self.previous() if "skipped" not in r} if resume else set()

  def key(self, rec: dict) -> tuple:
    return tuple(rec.get(f) for f in self.key_fields)

  def previous(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return json.load(f)

  def merge_previous(self, records: list[dict]) -> list[dict]:
    """This run's records, then those of the file that this run did not measure."""
    seen = {self.key(r) for r in records}
    return records + [r for r in self.previous() if self.key(r) not in seen]

  def wanted(self, rec: dict) -> bool:
    return self.key(rec) not in self.done

  def over(self) -> bool:
    return self.budget_s is not None and time.perf_counter() - self.t0 > self.budget_s

  def runs(self, rec: dict) -> bool:
    """Whether to measure rec now (False: done before, or left out for the budget, and recorded as such)."""
    if not self.wanted(rec):
      return False
    if self.over():
      self.left_out.append({f: rec.get(f) for f in self.key_fields if rec.get(f) is not None})
      return False
    return True
