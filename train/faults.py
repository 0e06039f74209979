"""What a training run does about its own failures: non-finite updates and an explicit resume step.

Non-finite updates (`train.on_nonfinite`). Every train step reports whether its update is finite (its loss and
gradient norm; under "skip" its new parameters too), and before a checkpoint is written the loss of the state
about to be saved is computed on one test batch (`NonFiniteGuard.checkpoint`): parameters that have blown up
(finite, of magnitude 1e30, but with a NaN forward) are never saved, so the last good checkpoint is one that
trains on. On a non-finite update the run
    stop      raises NonFiniteLossError naming the step and the last good checkpoint (the default);
    rollback  restores the last good checkpoint (the initial state if none was saved) and goes on with the
              learning rate scaled by `train.rollback_lr_factor`, at most `train.nonfinite_limit` times a run;
    skip      drops the update (parameters and optimizer state stay, the batch is consumed), and stops after
              `train.nonfinite_limit` dropped updates in a row; a blown-up state is then not saved either.
What was done (rollbacks, the learning-rate scale, dropped updates) is saved in each checkpoint's meta
(`FaultRecord`), so a resumed run goes on with it.

`train.resume_from=N` resumes from checkpoint N instead of the latest one, moving the newer checkpoints aside
(`choose_resume_step`); the checkpoints written after it record N, so rerunning the same command later does not
go back to N again.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from bmojo_jax.train import files
from bmojo_jax.train.checkpoint import CheckpointError

POLICIES = ("stop", "rollback", "skip")


class NonFiniteLossError(FloatingPointError):
  """Training diverged; the message names the step, what was not finite, and the last good checkpoint."""


class Rollback(Exception):  # noqa: N818
  """Go back to the last good checkpoint: update `step` was not finite (`what`). Control flow inside the train
  loop (on_nonfinite=rollback); it never escapes `train`."""

  def __init__(self, step: int, what: str):
    super().__init__(f"step {step}: {what}")
    self.step, self.what = step, what


def validate(t) -> None:
  """Raises ValueError naming the first impossible fault-handling field of the train config `t`."""
  policy = t.get("on_nonfinite", "stop")
  if policy not in POLICIES:
    raise ValueError(f"train.on_nonfinite={policy!r} is unknown; choose one of {', '.join(POLICIES)}.")
  factor = t.get("rollback_lr_factor", 0.5)
  if not 0.0 < factor < 1.0:
    raise ValueError(f"train.rollback_lr_factor={factor} must be in (0, 1): the learning rate is multiplied by "
                     "it at each rollback.")
  if int(t.get("nonfinite_limit", 3)) < 1:
    raise ValueError(f"train.nonfinite_limit={t.nonfinite_limit} must be >= 1.")
  if t.get("resume_from") is not None and int(t.resume_from) < 0:
    raise ValueError(f"train.resume_from={t.resume_from} must be a checkpoint step (>= 0).")


# ----------------------------------------------------------------------------------------------- in the step
def all_finite(tree) -> jax.Array:
  """A bool scalar: every floating-point leaf of `tree` is finite (one reduction per leaf, fused by XLA)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def keep_if(ok: jax.Array, new, old):
  """`new` where ok, else `old` (trees of the same structure): how "skip" drops an update inside the step."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


# ----------------------------------------------------------------------------------------------- on the host
@dataclasses.dataclass
class FaultRecord:
  """What a run has done about non-finite updates, and where it was resumed from; in checkpoint meta["faults"]."""
  lr_scale: float = 1.0            # learning-rate multiplier left by the rollbacks
  rollbacks: int = 0
  skipped: int = 0                 # updates dropped by on_nonfinite=skip
  resumed_from: int | None = None  # the train.resume_from these checkpoints descend from

  @classmethod
  def from_meta(cls, meta: dict[str, Any] | None) -> "FaultRecord":
    saved = (meta or {}).get("faults", {})
    return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})

  def to_meta(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class NonFiniteGuard:
  """Applies `train.on_nonfinite` to a run's updates, in order, and writes only checkpoints whose state gives a
  finite loss. Tracks the last good checkpoint (`last_saved`) for the messages and for rollbacks.

  say(message) shows a message to the user; `record` is updated in place (saved with each checkpoint)."""

  def __init__(self, t, record: FaultRecord, ckpt_dir: Callable[[int], str], say: Callable[[str], None],
               last_saved: int | None, start: int):
    self.policy = t.get("on_nonfinite", "stop")
    self.factor = float(t.get("rollback_lr_factor", 0.5))
    self.limit = int(t.get("nonfinite_limit", 3))
    self.record, self.ckpt_dir, self.say = record, ckpt_dir, say
    self.last_saved = last_saved
    self.observed = start          # the last update acted on
    self.in_a_row = 0              # updates dropped in a row (skip)

  def last_good(self) -> str:
    if self.last_saved is None:
      return "No checkpoint was saved before it: a rerun starts from scratch."
    return (f"The last good checkpoint is step {self.last_saved} ({self.ckpt_dir(self.last_saved)}); it was left "
            "intact.")

  def observe(self, step: int, metrics: dict[str, Any]) -> None:
    """Acts on update `step` (its train-step metrics, on the device or fetched) once: nothing when finite; a
    message when dropped ("skip"); raises Rollback or NonFiniteLossError otherwise."""
    if step <= self.observed:
      return
    self.observed = step
    if bool(jax.device_get(metrics["finite"])):
      self.in_a_row = 0
      return
    loss, norm = jax.device_get((metrics["loss"], metrics["grad_norm"]))
    what = f"update {step} is not finite (loss {float(loss):.4g}, gradient norm {float(norm):.4g})"
    if self.policy != "skip":
      self._diverged(step, what)
    self.in_a_row += 1
    self.record.skipped += 1
    if self.in_a_row > self.limit:
      self._stop(step, what, f"after {self.in_a_row} non-finite updates in a row (train.nonfinite_limit="
                             f"{self.limit})")
    self.say(f"Step {step}: {what}; update dropped (train.on_nonfinite=skip, {self.in_a_row} in a row).")

  def checkpoint(self, step: int, probe: Callable[[], jax.Array], write: Callable[[], None]) -> None:
    """Writes checkpoint `step` (write()) if its state's loss (probe()) is finite; else the state has blown up:
    raises Rollback or NonFiniteLossError, or under "skip" goes on without the checkpoint."""
    if self.last_saved == step:
      return
    loss = float(jax.device_get(probe()))
    if math.isfinite(loss):
      write()
      self.last_saved = step
      return
    what = f"the state after update {step} gives a non-finite loss ({loss:.4g}) on a test batch"
    if self.policy != "skip":
      self._diverged(step, what)
    self.say(f"Step {step}: {what}; its checkpoint is not written (train.on_nonfinite=skip).")

  def rolled_back(self, step: int, r: Rollback) -> None:
    """Records a rollback to `step` (the last good checkpoint, 0 for the initial state) and says so."""
    self.record.rollbacks += 1
    self.record.lr_scale *= self.factor
    self.observed, self.in_a_row = step, 0
    where = self.ckpt_dir(step) if self.last_saved is not None else "the initial state"
    self.say(f"Step {r.step}: {r.what}; rolled back to step {step} ({where}) with the learning rate scaled by "
             f"{self.record.lr_scale:g} (rollback {self.record.rollbacks} of at most {self.limit}).")

  def _diverged(self, step: int, what: str) -> None:
    if self.policy == "rollback":
      if self.record.rollbacks >= self.limit:
        self._stop(step, what, f"after {self.record.rollbacks} rollbacks that did not get past it "
                               f"(train.nonfinite_limit={self.limit})")
      raise Rollback(step, what)
    self._stop(step, what, "(train.on_nonfinite=stop)")

  def _stop(self, step: int, what: str, why: str) -> None:
    hint = {"stop": "set --config.train.on_nonfinite=rollback (or skip)",
            "rollback": "lower train.rollback_lr_factor", "skip": "set --config.train.on_nonfinite=rollback"}
    raise NonFiniteLossError(f"Training diverged at step {step}: {what}. Stopped {why}. {self.last_good()} To get "
                             f"past it, lower --config.optim.learning_rate or {hint[self.policy]}.")


def finished(results_path: str, start: int, t) -> tuple[str, dict[str, Any]] | None:
  """(why, its results) when the run whose latest checkpoint is `start` has finished, else None: it has a
  results.json of that checkpoint (not one written at an earlier stop, e.g. by SIGTERM), and train.num_steps is
  reached or it stopped at the target accuracy still asked for, or by train.patience (still set)."""
  if not os.path.lexists(results_path):
    return None
  results = files.read_json(results_path, "Delete it (or move it away) and rerun the same command: the run resumes "
                                          "from its latest checkpoint and writes it again.")
  if results.get("step") != start:
    return None
  if start >= int(t.num_steps):
    return f"train.num_steps={int(t.num_steps)}", results
  accuracy = results.get("val_accuracy", results.get("test_accuracy"))   # what the target was read on
  if (results.get("stopped_by") == "target_accuracy" and results.get("step") == start and t.target_accuracy
      and accuracy is not None and accuracy >= t.target_accuracy):
    split = "validation" if "val_accuracy" in results else "test"
    return f"{split} accuracy {accuracy:.4f} >= train.target_accuracy={t.target_accuracy}", results
  if results.get("stopped_by") == "patience" and int(t.get("patience", 0)):
    return f"no validation improvement in train.patience={int(t.patience)} evaluations", results
  return None


# ----------------------------------------------------------------------------------------------- resume
def start_point(ckpt, resume_from: int | None, say: Callable[[str], None]) -> tuple[int | None, FaultRecord]:
  """(the checkpoint step to resume from or None, the run's FaultRecord): `choose_resume_step`, then the record
  saved with that checkpoint (its resumed_from set when it is train.resume_from's)."""
  step = choose_resume_step(ckpt, resume_from, say)
  record = FaultRecord() if step is None else FaultRecord.from_meta(ckpt.read_meta(step))
  if resume_from is not None and step == resume_from:
    record.resumed_from = int(resume_from)
  return step, record


def choose_resume_step(ckpt, resume_from: int | None, say: Callable[[str], None]) -> int | None:
  """The checkpoint step a run resumes from: the latest one, or `resume_from` (train.resume_from), in which case
  the newer checkpoints are moved aside (never deleted) unless the latest one already descends from it.

  ckpt: a `train.checkpoint.Checkpointer`; say(message) tells the user what was done."""
  latest = ckpt.latest_step()
  if resume_from is None or latest == resume_from:
    return latest
  steps = ckpt.all_steps()
  if resume_from not in steps:
    intact = ckpt.intact_steps()
    raise CheckpointError(f"train.resume_from={resume_from}: there is no checkpoint {resume_from} in "
                          f"{ckpt.directory}; intact checkpoints: {', '.join(map(str, intact)) or 'none'}.")
  if latest is not None and latest > resume_from and ckpt.meta_or_none(latest, "faults", "resumed_from") == \
      resume_from:
    say(f"train.resume_from={resume_from} was applied before: checkpoint {latest} descends from it, so the run "
        f"resumes from {latest}. Drop the option from the command.")
    return latest
  newer = [s for s in steps if s > resume_from]
  where = ckpt.set_aside(newer)
  say(f"train.resume_from={resume_from}: checkpoints {', '.join(map(str, newer))} moved to {where} (delete them "
      "when you no longer need them).")
  return resume_from
