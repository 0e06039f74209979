"""Metrics: TensorBoard event files (tensorboardX), a JSONL file, and a tqdm progress bar with the same figures.

Every record is one line of `<workdir>/metrics.jsonl`: {"step": s, "split": "train"|"eval", name: value, …}.
After a resume, steps logged after the last checkpoint appear twice; readers keep the last line per
(split, step) (`read_metrics`). Only process 0 writes.
"""

import json
import os
from typing import Any, Iterable

import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Writes scalars to TensorBoard and JSONL and shows them on a progress bar."""

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0, enabled: bool = True,
               progress_bar: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self._bar = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
    if progress_bar:   # "compiling" until the first step ends; its rate and ETA count from there
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, desc="compiling", dynamic_ncols=True)
      self._compiled = False

  def write(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    for name, value in scalars.items():
      self._tb.add_scalar(f"{split}/{name}", value, step)
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
    self._jsonl.flush()
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
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    self._tb.flush()
    self._tb.close()
    self._jsonl.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl (file or workdir), the last one per (split, step), sorted by step."""
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  records: dict[tuple[str, int], dict[str, Any]] = {}
  with open(path, encoding="utf-8") as f:
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
