"""The training progress bar says "compiling" until the first step ends, and its rate and time left count from
there, not from the compile (train/metrics.py)."""

import io
import time

from bmojo_jax.train import metrics


def test_bar_says_compiling_until_the_first_step_then_times_the_steps(tmp_path, monkeypatch):
  screen = io.StringIO()
  real_tqdm = metrics.tqdm.tqdm
  monkeypatch.setattr(metrics.tqdm, "tqdm", lambda *a, **k: real_tqdm(*a, **k, file=screen, mininterval=0))
  writer = metrics.MetricWriter(str(tmp_path), total_steps=1000, initial_step=0)
  last = lambda: screen.getvalue().split("\r")[-1]
  assert last().startswith("compiling:")
  time.sleep(0.3)                      # the first step: compiling
  writer.advance(1)
  assert last().startswith("train:") and "?it/s" in last()   # the compile is not a step's time
  for step in (2, 3, 4):
    time.sleep(0.01)
    writer.advance(step)
  shown = last()
  assert shown.startswith("train:") and "4/1000" in shown
  eta = shown.split("<")[1].split(",")[0]          # [elapsed<left, rate]: ~10 s left at ~100 steps/s, not 5 min
  assert eta.count(":") == 1 and int(eta.split(":")[0]) < 2, shown
  writer.close()
