"""A population's training loop and its runs' files (the device side: `train.population.Population`).

Every K steps (a dispatch) the loop reads the per-step metrics back and logs each run's train records as the
trainer does (means over train.log_every updates); every `train.eval_every` steps and at the end it evaluates
every run, applies the stopping rules (target accuracy, collapse, patience, non-finite) and masks the runs that
stopped.

Files: `<workdir>/<run name>/` is a bmojo-train workdir, written by `train.runs` as the trainer writes
its own: config.json (the run's single-run config: its learning rate and seed), tokenizer.json, metrics.jsonl
and TensorBoard events (`train.metrics.MetricWriter`), results.json (the trainer's record plus learning_rate,
seed and `population`, strict JSON), curves.png, and with `save_checkpoints` the final state as the trainer's
Orbax checkpoint, so `bmojo-eval` and `bmojo-generate` read it. A population does not resume: a rerun starts
its runs over.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import metrics as metrics_lib
from bmojo_jax.train import runs as runs_lib
from bmojo_jax.train import steps as steps_lib
from bmojo_jax.train.population import Population, run_config


def train(pop: Population, workdir: str, *, progress_bar: bool = True, save_checkpoints: bool = False) -> list[dict]:
  """Trains every run of `pop` to train.num_steps or its early stop; returns each run's results (as results.json).

  The final state stays in `pop.state`."""
  start_wall = time.time()
  t = pop.config.train
  target, log_every, k_max = float(t.target_accuracy), int(t.log_every), pop.steps_per_dispatch
  dirs = [os.path.join(os.path.abspath(workdir), r.name) for r in pop.runs]
  writers = []
  for r, d in zip(pop.runs, dirs):
    os.makedirs(d, exist_ok=True)
    for name in (metrics_lib.METRICS_FILE, runs_lib.RESULTS_FILE):   # a population starts its runs over
      if os.path.exists(os.path.join(d, name)):
        os.remove(os.path.join(d, name))
    runs_lib.write_run_files(d, run_config(pop.config, r), pop.task.tokenizer)
    writers.append(metrics_lib.MetricWriter(d, total_steps=pop.num_steps, progress_bar=False))
  bar = tqdm.tqdm(total=pop.num_steps, desc=f"{pop.size} runs", dynamic_ncols=True, disable=not progress_bar)

  state = pop.init_state()
  steps = np.zeros(pop.size, int)              # updates done, per run
  stopped_by: list[str | None] = [None] * pop.size
  last_eval: list[tuple[int, dict] | None] = [None] * pop.size
  stoppers = [dataclasses.replace(pop.early_stopping) if pop.early_stopping else None for _ in pop.runs]
  recording = np.ones(pop.size, bool)          # runs whose records are still written
  pending = [[] for _ in pop.runs]             # per-step train metrics since each run's last record
  train_time, trained_steps, step = 0.0, 0, 0

  def flush(r):
    """Run r's train record at its last update: means since its previous record, as the trainer logs."""
    if pending[r]:
      avg = {k: float(np.mean([v[k] for v in pending[r]])) for k in ("loss", "accuracy", "grad_norm")}
      avg["learning_rate"] = pending[r][-1]["learning_rate"]
      avg["tokens_per_s"] = len(pending[r]) * pop.tokens_per_step / sum(v["seconds"] for v in pending[r])
      writers[r].write(int(steps[r]), avg, "train")
      pending[r] = []

  try:
    while step < pop.num_steps and recording.any():
      t0 = time.time()
      state, m = pop.dispatch(state)
      m = jax.device_get(m)
      seconds = time.time() - t0
      train_time += seconds
      k_steps = min(k_max, pop.num_steps - step)
      for k in range(k_steps):
        for r in np.flatnonzero(m["updated"][k]):
          pending[r].append({**{n: float(m[n][k, r]) for n in ("loss", "accuracy", "grad_norm", "learning_rate")},
                             "seconds": seconds / k_max})
          steps[r] = step + k + 1
          if steps[r] % log_every == 0:
            flush(r)
      trained_steps += int(m["updated"][:k_steps].sum())
      step += k_steps
      active = np.asarray(jax.device_get(state["active"]))
      for r in np.flatnonzero(recording & ~active):
        if stopped_by[r] is None:
          stopped_by[r] = "non_finite_loss"
          bar.write(f"{pop.runs[r].name}: non-finite loss or gradient at step {steps[r] + 1}; stopped with "
                    "its last finite parameters.")
      if (pop.eval_every and step % pop.eval_every == 0) or step >= pop.num_steps or not active.any():
        evals = pop.evaluate(state["params"])
        # What the stopping rules read: the validation split when there is one, else the test split.
        decisive = pop.validate(state["params"]) if pop.early_stopping else evals
        hit = np.zeros(pop.size, bool)
        for r in np.flatnonzero(recording):
          flush(r)
          last_eval[r] = (int(steps[r]), evals[r])
          writers[r].write(int(steps[r]), evals[r], "eval")
          if stoppers[r]:
            writers[r].write(int(steps[r]), decisive[r], "val")
            stoppers[r].observe(int(steps[r]), decisive[r], evals[r])
          outcome = steps_lib.target_outcome(decisive[r], target, pop.cfg.vocab_size)
          if stopped_by[r] is None and outcome:
            stopped_by[r], hit[r] = outcome, True
            bar.write(f"{pop.runs[r].name}: " + (
                f"step {steps[r]}: eval accuracy {decisive[r]['accuracy']:.4f} >= target {target}; stopping "
                "early." if outcome == "target_accuracy" else
                steps_lib.collapse_message(int(steps[r]), decisive[r], pop.cfg.vocab_size, target)))
          elif stopped_by[r] is None and stoppers[r] and stoppers[r].stop:
            stopped_by[r], hit[r] = "patience", True
            bar.write(f"{pop.runs[r].name}: " + stoppers[r].message(int(steps[r])))
        recording &= np.array([s is None for s in stopped_by])
        if hit.any():
          state["active"] = state["active"] & jnp.asarray(~hit)
        bar.set_postfix({"running": int(recording.sum()),
                         "best_acc": f"{max(e['accuracy'] for e in evals):.4f}"}, refresh=False)
      bar.update(step - bar.n)
  finally:
    bar.close()
    for w in writers:
      w.close()
  pop.state = state
  population = {"runs": pop.size, "shared_data": pop.shared_data, "steps_per_dispatch": k_max,
                "tokens_per_s": trained_steps * pop.tokens_per_step / max(train_time, 1e-9)}
  return [_finish(pop, r, d, int(steps[r]), stopped_by[r], last_eval[r], stoppers[r], train_time, start_wall,
                  population, save_checkpoints) for r, d in enumerate(dirs)]


def _finish(pop: Population, r: int, workdir: str, step: int, stopped_by: str | None,
            last_eval: tuple[int, dict] | None, stopper: steps_lib.EarlyStopping | None, train_time: float,
            start_wall: float, population: dict, save_checkpoint: bool) -> dict[str, Any]:
  """Run r's results.json (the trainer's record, plus its learning rate, seed and population; with a
  validation split the test figures of its best validation evaluation, `steps.EarlyStopping`), its
  curves.png (train.plot) and, if asked, its final state as the trainer's checkpoint; returns the results."""
  run = pop.runs[r]
  evaluation, eval_step = last_eval[1] if last_eval else None, last_eval[0] if last_eval else None
  extra = {}
  if stopper and stopper.best_step is not None:
    evaluation, eval_step, extra = stopper.best_test, stopper.best_step, stopper.record()
  res = runs_lib.results_record(pop.setup, step=step, stopped_by=stopped_by, wall_s=time.time() - start_wall,
                                tokens_per_s=step * pop.tokens_per_step / max(train_time, 1e-9),
                                evaluation=evaluation, eval_step=eval_step, learning_rate=run.learning_rate,
                                seed=run.seed, population=dict(population, index=r), **extra)
  res = runs_lib.write_results(workdir, res, f"run {run.name}'s step {eval_step}")
  if save_checkpoint:    # no data iterator: the data is drawn on the device
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1, async_save=False)
    try:
      ckpt.save(step, pop.run_state(pop.state, r, step), None, runs_lib.checkpoint_meta(pop.setup))
    finally:
      ckpt.close()
  if pop.config.train.plot:
    from bmojo_jax.train import plots  # pylint: disable=g-import-not-at-top
    plots.maybe_plot(workdir)
  return res
