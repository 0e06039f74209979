"""Metrics: TensorBoard event files, a JSONL file, and a tqdm progress bar with the same figures.

Every record is one line of `<workdir>/metrics.jsonl`: {"step": s, "split": "train"|"eval"|"val", name: value, …}
("val": the validation split of early stopping, `train.steps.EarlyStopping`).
After a resume from a SIGKILL, steps logged after the last checkpoint appear twice; readers keep the last line
per (split, step) (`read_metrics`). Only process 0 writes.

Both files are written synchronously by the calling thread and flushed at every `write` (each log interval):
a killed run loses nothing it logged, and a write that fails (a full disk) raises `files.WriteError` at once
rather than killing a background thread that the next write would wait on forever (tensorboardX's
SummaryWriter does that). The event files are TensorBoard's format (tensorboardX's protos and record framing),
written by `_EventFile`. Both are opened without following a symbolic link out of the workdir (`files`).
"""

import json
import os
import time
from typing import Any, Iterable

import tqdm

from bmojo_jax.train import files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class _EventFile:
  """A TensorBoard event file written synchronously by tensorboardX's `EventsWriter` (no writer thread, so a
  full disk raises here, in the training loop, instead of killing a thread the loop then waits on). The file
  name is new for each writer (time, host, pid) inside the checked `tensorboard/` folder."""

  def __init__(self, directory: str):
    from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top
    self._writer = EventsWriter(os.path.join(directory, "events"), filename_suffix=f".{os.getpid()}")
    self.path = self._writer._file_name  # pylint: disable=protected-access

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary.scalar(tag, value)))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _cut_torn_line(path: str) -> None:
  """Cuts a last line without its newline, the part-record of a run killed while writing it, so that the next
  record starts a line of its own (what the killed run had logged of that step is logged again on resume)."""
  if not os.path.lexists(path):
    return
  with files.open_nofollow(path, "r+b") as f:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - (1 << 16)))
    tail = f.read()
    if tail and not tail.endswith(b"\n"):
      f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)


class MetricWriter:
  """Writes scalars to TensorBoard and JSONL and shows them on a progress bar; files.WriteError when a file
  cannot be written."""

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0, enabled: bool = True,
               progress_bar: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self._bar = None
    if not enabled:
      return
    tb_dir = files.inside(workdir, TENSORBOARD_DIR)
    self._jsonl_path = files.inside(workdir, METRICS_FILE)
    try:
      os.makedirs(tb_dir, exist_ok=True)
      self._tb = _EventFile(tb_dir)
      _cut_torn_line(self._jsonl_path)
      self._jsonl = files.open_nofollow(self._jsonl_path, "a")
    except OSError as e:
      raise files.WriteError(getattr(e, "filename", None) or workdir, e) from None
    if progress_bar:   # "compiling" until the first step ends; its rate and ETA count from there
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, desc="compiling", dynamic_ncols=True)
      self._compiled = False

  def write(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
    """Logs `metrics` at `step` in both files and flushes them."""
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    path = self._tb.path
    try:
      for name, value in scalars.items():
        self._tb.add_scalar(f"{split}/{name}", value, step)
      self._tb.flush()
      path = self._jsonl_path
      self._jsonl.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
      self._jsonl.flush()
    except OSError as e:
      raise files.WriteError(path, e) from None
    if self._bar is not None:
      short = {f"{split[0]}_{k}" if split != "train" else k: f"{v:.4g}" for k, v in scalars.items()}
      self._bar.set_postfix(short, refresh=False)

  def advance(self, step: int) -> None:
    """Moves the progress bar to `step`. The first call ends the compile: the bar is renamed "train" and its
    clock restarts, so the rate and the time left are those of the steps, not of compiling."""
    if self._bar is None or step <= self._bar.n:
      return
    if not self._compiled:
      self._compiled = True
      bar = self._bar
      bar.reset(total=bar.total)
      bar.initial = bar.n = bar.last_print_n = step
      bar.set_description("train", refresh=False)
      bar.refresh()
      return
    self._bar.update(step - self._bar.n)

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    """Closes the files (after a failed write too: what cannot be flushed any more is dropped)."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    failed = None
    for f, path in ((self._tb, self._tb.path), (self._jsonl, self._jsonl_path)):
      try:
        f.close()
      except OSError as e:
        failed = failed or files.WriteError(path, e)
    if failed:
      raise failed


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl (file or workdir), the last one per (split, step), sorted by step."""
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  records: dict[tuple[str, int], dict[str, Any]] = {}
  with files.open_nofollow(path) as f:
    for line in f:
      line = line.strip()
      if line:
        r = json.loads(line)
        records[(r.get("split", "train"), int(r["step"]))] = r
  return sorted(records.values(), key=lambda r: (r["step"], r.get("split", "")))


def series(records: Iterable[dict[str, Any]], split: str, name: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric of one split."""
  pairs = [(r["step"], r[name]) for r in records if r.get("split") == split and name in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]
