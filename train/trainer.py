"""The training loop: `train(config, workdir)` trains (or resumes) the run in `workdir`.

Step s means "after s optimizer updates"; the loss logged at step s is the one computed by update s.
What the loop does about a non-finite update, a failed save or an explicit resume step is `train/faults.py`'s
and `train/checkpoint.py`'s; SIGTERM / SIGINT (`StopRequest`) checkpoint and stop after the current step.
What it builds before the first step is `train/setup.py`'s, its jitted steps and evaluation `train/steps.py`'s,
and the files it writes (config.json, tokenizer.json, checkpoint meta, results.json) `train/runs.py`'s.
"""

import collections
import contextlib
import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train.data import pipeline
from bmojo_jax.train import faults
from bmojo_jax.train import files
from bmojo_jax.train import metrics as metrics_lib
from bmojo_jax.train import runs
from bmojo_jax.train import sharding as shard_lib
from bmojo_jax.train import steps as steps_lib
from bmojo_jax.train import tasks as tasks_lib
from bmojo_jax.train.setup import Setup, build, restore_state
from bmojo_jax.train.workdir_lock import WorkdirLock

MAX_IN_FLIGHT = 2  # train steps dispatched ahead of the last finished one

NonFiniteLossError = faults.NonFiniteLossError   # training diverged (train.on_nonfinite=stop, or past its limit)


class LateStop(Exception):  # noqa: N818
  """SIGTERM / SIGINT after the last step, during the final evaluation or results.json: the run stops there (its
  last checkpoint is saved); a rerun evaluates it and writes results.json."""


class StopRequest:
  """Signal handler that asks the loop to checkpoint and stop after the current step; once `late` is set (the
  loop is over and its checkpoint saved), it raises LateStop where the run is instead."""

  def __init__(self):
    self.signum: int | None = None
    self.late: str | None = None     # LateStop's message, set after the loop

  def __call__(self, signum, frame=None):
    del frame
    self.signum = signum
    if self.late:
      raise LateStop(f"{signal.Signals(signum).name} received after the last step: {self.late}")

  def arm(self, message: str) -> None:
    """From now on a signal raises LateStop(message); one that came already raises it here."""
    self.late = message
    if self.signum is not None:
      self(self.signum)


@contextlib.contextmanager
def _handle_signals(stop: StopRequest):
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def train(config: ml_collections.ConfigDict, workdir: str, *, devices=None,
          step_callback: Callable[[int, dict[str, Any]], None] | None = None,
          stop: StopRequest | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final metrics (also in results.json).

  step_callback(step, state) is called after each update (tests use it to send signals). SIGTERM / SIGINT are
  handled from the start: one that comes before the first step stops the run there, with nothing new to save.
  """
  start_wall = time.time()
  workdir = os.path.abspath(workdir)
  stop = stop or StopRequest()
  with _handle_signals(stop):
    setup = build(config, devices)      # validates everything first: a config that cannot work creates nothing
    steps_lib.early_stopping(setup)     # and train.patience / min_delta
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
      raise ValueError(f"The workdir {workdir} is a file, not a folder: name a folder (it is created if missing).")
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise files.WriteError(workdir, e) from None
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:                          # one run per workdir, before anything is written
      return _train(config, setup, workdir, start_wall, step_callback, stop)


def config_warnings(setup: Setup) -> list[str]:
  """Settings that run but are probably not what was meant, one line each (shown at the start of a run)."""
  config, out = setup.config, []
  warmup, num_steps = int(config.optim.warmup_steps), int(config.train.num_steps)
  if warmup > num_steps:
    out.append(f"Warning: optim.warmup_steps={warmup} > train.num_steps={num_steps}: the learning rate never "
               f"reaches optim.learning_rate={config.optim.learning_rate}.")
  if setup.task.kind == "mqar" and setup.cfg.window is not None and setup.cfg.window >= setup.task.seq_len:
    out.append(f"Warning: model.window={setup.cfg.window} >= data.seq_len={setup.task.seq_len}: every key stays "
               "inside the attention window, so MQAR no longer tests recall beyond it.")
  return out


def unlogged_metrics(meta: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
  """The (step, metrics) of the updates a checkpoint saved before they were logged (meta["unlogged"])."""
  return [(int(r["step"]), {k: v for k, v in r.items() if k != "step"}) for r in meta.get("unlogged", [])]


def _train(config, setup: Setup, workdir: str, start_wall: float, step_callback, stop) -> dict[str, Any]:
  t = config.train
  lead = jax.process_index() == 0
  ckpt = ckpt_lib.Checkpointer(files.inside(workdir, "checkpoints"), max_to_keep=int(t.keep_checkpoints),
                               async_save=bool(t.async_checkpointing), writer=True)
  notes = [f"Removed {name} from {ckpt.directory}: the unfinished save of an earlier run."
           for name in ckpt.removed_unfinished] + config_warnings(setup)
  local_batch = int(t.batch_size) // jax.process_count()
  make_iterator = functools.partial(
      pipeline.make_train_iterator, setup.task.train_source, batch_size=local_batch, seed=int(config.seed),
      shard_index=jax.process_index(), shard_count=jax.process_count(), worker_count=int(t.data_workers))
  it = make_iterator()
  latest, record = faults.start_point(ckpt, t.get("resume_from"), notes.append)
  state = setup.init_state() if latest is None else restore_state(ckpt, latest, setup, it)
  start = int(jax.device_get(state["step"]))
  results_path = files.inside(workdir, runs.RESULTS_FILE)
  finished = faults.finished(results_path, start, t)
  if finished:
    ckpt.close()
    if lead:
      print("\n".join(notes + [f"{workdir} already finished at step {start} ({finished[0]}); its results are kept "
                               f"in {results_path}. Raise --config.train.num_steps (or train.target_accuracy) to "
                               "train further."]))
    return finished[1]
  if latest is not None:
    notes.append(f"{workdir}: resuming from step {latest} (checkpoint {ckpt.step_dir(latest)}).")

  def stopper_at(saved_step: int | None) -> steps_lib.EarlyStopping | None:
    """Early stopping on the validation split (None without one), as checkpoint `saved_step` left it (its count
    and best: a resumed or rolled-back run goes on from there) under this config's patience and min_delta."""
    fresh = steps_lib.early_stopping(setup)
    saved = None if saved_step is None or fresh is None else ckpt.read_meta(saved_step).get("early_stopping")
    if not saved:
      return fresh
    return dataclasses.replace(steps_lib.EarlyStopping.from_meta(saved), patience=fresh.patience,
                               min_delta=fresh.min_delta)

  stopper = stopper_at(latest)
  if lead:
    runs.write_run_files(workdir, config, setup.task.tokenizer)

  # Out-of-range ids fail before any update: the first eval batch is checked here, every train batch below.
  first_eval = next(iter(pipeline.make_eval_iterator(setup.task.eval_source, batch_size=1)))
  tasks_lib.check_batch(first_eval, setup.cfg.vocab_size, "test data")

  accum, skip = int(t.grad_accum_steps), t.get("on_nonfinite", "stop") == "skip"
  if t.get("on_nonfinite", "stop") == "rollback":   # the scale an argument: a rollback compiles nothing new
    scaled_step = steps_lib.make_train_step(setup, accum, None, skip)
    train_step = lambda state, batch: scaled_step(state, batch, np.float32(record.lr_scale))
  else:
    train_step = steps_lib.make_train_step(setup, accum, record.lr_scale, skip)
  eval_step = steps_lib.make_eval_step(setup)
  probe_batch = next(steps_lib.eval_batches(setup))       # a state whose loss on it is not finite is never saved
  num_steps = int(t.num_steps)
  writer = metrics_lib.MetricWriter(workdir, total_steps=num_steps, initial_step=start, enabled=lead,
                                    progress_bar=bool(t.progress_bar))
  for note in notes:
    writer.message(note)
  tokens_per_step = int(t.batch_size) * setup.task.seq_len
  # The updates since the last logged step: (step, metrics), on the device until `flush` fetches them. A
  # checkpoint saves the fetched ones (meta["unlogged"]) and a resume takes them back, so the next logged average
  # is the uninterrupted run's.
  pending: list[tuple[int, dict[str, Any]]] = [] if latest is None else unlogged_metrics(ckpt.read_meta(latest))
  carried = len(pending)                # of them, updates of an earlier process (no time or tokens here)
  in_flight: collections.deque = collections.deque()
  last_eval: dict[str, float] | None = None
  last_eval_step: int | None = None
  stopped_by, step = None, start
  train_time, trained_steps, interval_start = 0.0, 0, time.time()
  guard = faults.NonFiniteGuard(t, record, ckpt.step_dir, writer.message, last_saved=latest, start=start)

  def flush(log: bool = True):
    """Pulls the pending step metrics and acts on non-finite updates; with `log`, logs the averages of the
    finite ones and starts a new interval (without, they stay pending: a checkpoint or a stop between logged
    steps)."""
    nonlocal interval_start, train_time, trained_steps, carried
    if not pending:
      return
    pending[:] = zip([s for s, _ in pending], jax.device_get([m for _, m in pending]))   # one transfer
    for s, v in pending:
      guard.observe(s, v)
    in_flight.clear()
    if not log:
      return
    values, fresh = [v for _, v in pending], len(pending) - carried
    elapsed = time.time() - interval_start
    train_time += elapsed
    trained_steps += fresh
    kept = [v for v in values if v["finite"]]
    avg = ({k: float(np.mean([float(v[k]) for v in kept])) for k in ("loss", "accuracy", "grad_norm")}
           if kept else {})                 # in float64, whether the values were fetched or read from a checkpoint
    avg["learning_rate"] = float(values[-1]["learning_rate"])
    avg["tokens_per_s"] = tokens_per_step * fresh / max(elapsed, 1e-9)
    if len(kept) < len(values):
      avg["dropped_updates"] = len(values) - len(kept)
    writer.write(pending[-1][0], {k: v for k, v in avg.items() if np.isfinite(v)}, "train")
    writer.advance(pending[-1][0])
    pending.clear()
    carried = 0
    interval_start = time.time()

  def save(s):
    """Checkpoint s, if its state gives a finite loss on the probe batch (else train.on_nonfinite acts)."""
    nonlocal interval_start
    meta = lambda: dict(runs.checkpoint_meta(setup, record), unlogged=[
        {"step": int(p), **{k: float(v) for k, v in m.items()}} for p, m in pending],
        **({"early_stopping": stopper.to_meta()} if stopper else {}))
    guard.checkpoint(s, lambda: eval_step(state["params"], probe_batch)["ce_sum"],
                     lambda: ckpt.save(s, state, it, meta()))
    interval_start = time.time()

  def roll_back(r: faults.Rollback) -> int:
    """Back to the last good checkpoint (the initial state if none), with a lower learning rate."""
    nonlocal state, it, carried, stopper
    ckpt.wait()
    pending.clear()
    carried = 0
    in_flight.clear()
    back = guard.last_saved or 0
    if guard.last_saved is None:
      it, state = make_iterator(), setup.init_state()
    else:
      state = restore_state(ckpt, back, setup, it)
    stopper = stopper_at(guard.last_saved)
    guard.rolled_back(back, r)     # train_step reads the new record.lr_scale
    return back

  try:
    with _handle_signals(stop):
      while step < num_steps:
        if stop.signum is not None and step == start:     # came before the first step: nothing new to save
          stopped_by = signal.Signals(stop.signum).name
          where = f"the last checkpoint is step {latest}" if latest is not None else "no checkpoint was written"
          writer.message(f"{stopped_by} received before the first step: {where}; rerun the same command to "
                         "resume.")
          break
        try:
          step += 1
          batch = next(it)
          tasks_lib.check_batch(batch, setup.cfg.vocab_size, f"training batch of step {step}")
          state, m = train_step(state, shard_lib.shard_batch(steps_lib.model_batch(batch), setup.mesh))
          pending.append((step, m))
          if step_callback is not None:
            step_callback(step, state)
          ckpt.poll()                     # an asynchronous save that failed stops the run here
          # At most MAX_IN_FLIGHT steps queued on the device: the bar shows finished steps, and a stop request
          # is acted on after at most that many more steps rather than after everything queued.
          in_flight.append((step, m))
          while len(in_flight) > MAX_IN_FLIGHT:
            done_step, done_m = in_flight.popleft()
            guard.observe(done_step, done_m)
            writer.advance(done_step)
          done = step == num_steps
          if step % int(t.log_every) == 0 or done:
            flush()
          if (t.eval_every and step % int(t.eval_every) == 0) or done:
            flush()
            last_eval, last_eval_step = steps_lib.evaluate(setup, state["params"], eval_step), step
            writer.write(step, {k: v for k, v in last_eval.items() if np.isfinite(v)}, "eval")
            decisive = last_eval          # what the stopping rules read: the validation split when there is one
            if stopper:
              decisive = steps_lib.evaluate(setup, state["params"], eval_step, setup.task.val_source)
              writer.write(step, {k: v for k, v in decisive.items() if np.isfinite(v)}, "val")
              stopper.observe(step, decisive, last_eval)
            interval_start = time.time()
            stopped_by = steps_lib.target_outcome(decisive, t.target_accuracy, setup.cfg.vocab_size)
            if stopped_by == "target_accuracy":
              writer.message(f"Step {step}: eval accuracy {decisive['accuracy']:.4f} >= target "
                             f"{t.target_accuracy}; stopping early.")
            elif stopped_by == "collapsed":
              writer.message(steps_lib.collapse_message(step, decisive, setup.cfg.vocab_size, t.target_accuracy))
            elif stopper and stopper.stop:
              stopped_by = "patience"
              writer.message(stopper.message(step))
          if step % int(t.checkpoint_every) == 0 or done or stopped_by or stop.signum is not None:
            flush(log=False)
            save(step)
          if stop.signum is not None:
            stopped_by = signal.Signals(stop.signum).name
            saved = f"checkpoint of step {step} saved" if guard.last_saved == step else \
                f"the last checkpoint is step {guard.last_saved}"
            writer.message(f"{stopped_by} received: {saved}; rerun the same command to resume.")
          if stopped_by:
            break
        except faults.Rollback as r:
          step = roll_back(r)
  except BaseException as e:
    with contextlib.suppress(Exception):   # the error in flight is the one to report
      ckpt.wait()
    if isinstance(e, files.WriteError):    # a full disk under the metrics: say what is intact, then stop
      e.args = (f"{e}\n{ckpt.advice(e.fix)}",)
    for close in (ckpt.close, writer.close):
      with contextlib.suppress(Exception):
        close()
    raise
  try:
    ckpt.close()                          # waits for the last save: CheckpointSaveError if it failed
  finally:
    writer.close()
  if stopped_by is None:                  # a signal from here on stops the evaluation and results.json
    stop.arm(f"checkpoint {guard.last_saved} is saved; rerun the same command to evaluate it and write "
             "results.json.")

  final_step = max(step, start)
  if last_eval is None and stopped_by is None:
    last_eval, last_eval_step = steps_lib.evaluate(setup, state["params"], eval_step), final_step
    if stopper and stopper.best_step is None:
      stopper.observe(final_step, steps_lib.evaluate(setup, state["params"], eval_step, setup.task.val_source),
                      last_eval)
  extra = {}
  if stopper and stopper.best_step is not None:   # the test figures of the best validation evaluation
    last_eval, last_eval_step, extra = stopper.best_test, stopper.best_step, stopper.record()
  results = runs.results_record(setup, step=final_step, stopped_by=stopped_by, wall_s=time.time() - start_wall,
                                tokens_per_s=tokens_per_step * trained_steps / max(train_time, 1e-9),
                                evaluation=last_eval, eval_step=last_eval_step, record=record, **extra)
  if results.get("collapsed") and stopped_by != "collapsed" and lead:
    print(steps_lib.collapse_message(last_eval_step, last_eval, setup.cfg.vocab_size))
  if not lead:
    return runs.strict_json(results)[0]
  try:
    results = runs.write_results(workdir, results, f"the run's step {final_step}")
  except files.WriteError as e:
    e.args = (f"{e}\n{ckpt.advice(e.fix)}",)
    raise
  if t.plot:
    from bmojo_jax.train import plots  # pylint: disable=g-import-not-at-top
    plots.maybe_plot(workdir)
  return results
