"""Non-finite training (issue #21, #31): a divergence on a checkpoint step is not saved, and
train.on_nonfinite=stop | rollback | skip does what it says, within train.nonfinite_limit; a rollback takes the
early-stopping state back too. Runs of tests/train_runs.py's tiny config."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_runs import diverging_config, steps_of, tiny_config
from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import faults
from bmojo_jax.train import metrics as metrics_lib
from bmojo_jax.train import optim as optim_lib
from bmojo_jax.train import runs
from bmojo_jax.train import steps
from bmojo_jax.train import trainer


# Every train() here reuses the programs compiled before, here or in another module of tiny_train_config runs.
pytestmark = pytest.mark.usefixtures("train_compilation_cache")


# -------------------------------------------------------------------------------------------------- divergence
@pytest.mark.slow
def test_divergence_on_a_checkpoint_step_is_not_saved(tmp_path):
  """Update 2's loss is finite but its parameters give a NaN forward: checkpoint 2 is not written, and the
  message names step 1, which restores and evaluates to a finite loss."""
  workdir = str(tmp_path)
  with pytest.raises(trainer.NonFiniteLossError) as e:
    trainer.train(diverging_config(), workdir)
  message = str(e.value)
  assert message.startswith("Training diverged at step 2: the state after update 2 gives a non-finite loss")
  assert f"The last good checkpoint is step 1 ({workdir}/checkpoints/1)" in message
  assert "on_nonfinite=rollback" in message and len(message) < 600
  assert steps_of(workdir) == [1]
  assert np.isfinite(runs.evaluate_run(workdir)["test_loss"])


def test_divergence_before_any_checkpoint_says_so():
  """No checkpoint yet: the message says so in words (not "The last good checkpoint is none was written")."""
  guard = faults.NonFiniteGuard(tiny_config().train, faults.FaultRecord(), str, print, last_saved=None, start=0)
  with pytest.raises(trainer.NonFiniteLossError) as e:
    guard.checkpoint(1, probe=lambda: jnp.float32(jnp.nan), write=lambda: pytest.fail("saved a NaN state"))
  assert "No checkpoint was saved before it: a rerun starts from scratch." in str(e.value)
  assert "none" not in str(e.value)
  metrics = {"finite": jnp.bool_(False), "loss": jnp.float32(jnp.inf), "grad_norm": jnp.float32(jnp.nan)}
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 1: update 1 is not finite \(loss inf, gradient "
                                                        r"norm nan\)\. Stopped \(train.on_nonfinite=stop\)"):
    guard.observe(1, metrics)


@pytest.mark.slow
def test_rollback_lowers_the_learning_rate_and_resumes_with_it(tmp_path, capsys, monkeypatch):
  c = diverging_config(on_nonfinite="rollback", rollback_lr_factor=1e-31)
  workdir = str(tmp_path)
  stop_at_4 = lambda step, state: signal.raise_signal(signal.SIGTERM) if step == 4 else None
  built, make_train_step = [], steps.make_train_step
  monkeypatch.setattr(steps, "make_train_step", lambda *a: built.append(make_train_step(*a)) or built[-1])
  first = trainer.train(c, workdir, step_callback=stop_at_4)
  assert len(built) == 1 and built[0]._cache_size() == 1      # the rollback compiled no new step (issue #31)
  assert first["stopped_by"] == "SIGTERM" and first["step"] == 4
  assert first["faults"] == {"lr_scale": 1e-31, "rollbacks": 1, "skipped": 0, "resumed_from": None}
  out = capsys.readouterr().out
  assert ("Step 2: the state after update 2 gives a non-finite loss (nan) on a test batch; rolled back to step 1"
          in out)
  assert "learning rate scaled by 1e-31 (rollback 1 of at most 3)" in out
  second = trainer.train(c, workdir)                  # the scale is read back from checkpoint 4's meta
  assert second["step"] == 6 and np.isfinite(second["test_loss"]) and second["faults"]["lr_scale"] == 1e-31
  records = {r["step"]: r for r in metrics_lib.read_metrics(workdir) if r["split"] == "train"}
  schedule = optim_lib.make_schedule(c.optim, 6)
  for s in range(2, 7):           # update s uses schedule(s - 1), scaled
    np.testing.assert_allclose(records[s]["learning_rate"], float(schedule(s - 1)) * 1e-31, rtol=1e-6)
    assert np.isfinite(records[s]["loss"])
  assert steps_of(workdir) == [1, 2, 3, 4, 5, 6]


def test_rollbacks_stop_at_the_limit():
  t = tiny_config(on_nonfinite="rollback", nonfinite_limit=2).train
  guard = faults.NonFiniteGuard(t, faults.FaultRecord(), lambda s: f"ckpt/{s}", print, last_saved=3, start=3)
  nan = lambda: jnp.float32(jnp.nan)
  for n in (1, 2):
    with pytest.raises(faults.Rollback):
      guard.checkpoint(6, probe=nan, write=lambda: pytest.fail("saved a NaN state"))
    guard.rolled_back(3, faults.Rollback(6, "..."))
    assert guard.record.rollbacks == n and guard.record.lr_scale == 0.5 ** n
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 6: .* Stopped after 2 rollbacks that did not get "
                                                        r"past it \(train.nonfinite_limit=2\)\. The last good "
                                                        r"checkpoint is step 3 \(ckpt/3\)"):
    guard.checkpoint(6, probe=nan, write=lambda: pytest.fail("saved a NaN state"))


@pytest.mark.slow
def test_skip_drops_non_finite_updates_and_stops_at_the_limit(tmp_path, monkeypatch, capsys):
  """The batches of updates 3, 6 and 7 give NaN gradients (what "skip" is for: a bad batch, not a learning rate
  that stays too high): update 3 is dropped and training goes on from the same parameters and optimizer state;
  6 and 7 make two in a row, past train.nonfinite_limit=1."""
  apply_gradients = steps.apply_gradients

  def nan_at_3_6_7(tx, schedule, params, opt_state, g, loss, n, c, step, lr_scale=None):
    bad = jnp.isin(step + 1, jnp.array([3, 6, 7]))
    g = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), g)
    return apply_gradients(tx, schedule, params, opt_state, g, loss, n, c, step, lr_scale)

  monkeypatch.setattr(steps, "apply_gradients", nan_at_3_6_7)
  workdir = str(tmp_path)
  params = {}
  keep = lambda step, state: params.__setitem__(step, jax.tree.map(np.asarray, state["params"]))
  c = tiny_config(on_nonfinite="skip", nonfinite_limit=1, checkpoint_every=1, async_checkpointing=False)
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 7: update 7 is not finite .* Stopped after 2 "
                                                        r"non-finite updates in a row \(train.nonfinite_limit="
                                                        r"1\)\. The last good checkpoint is step 6"):
    trainer.train(c, workdir, step_callback=keep)
  out = capsys.readouterr().out
  assert "Step 3: update 3 is not finite" in out and "update dropped (train.on_nonfinite=skip, 1 in a row)" in out
  same = jax.tree.map(np.array_equal, params[2], params[3])
  assert all(jax.tree.leaves(same))                                         # update 3 dropped
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, params[3], params[4])))   # update 4 applied
  records = {r["step"]: r for r in metrics_lib.read_metrics(workdir) if r["split"] == "train"}
  assert records[3]["dropped_updates"] == 1 and "loss" not in records[3] and np.isfinite(records[4]["loss"])
  assert steps_of(workdir) == [1, 2, 3, 4, 5, 6]    # 3 and 6 hold the states of 2 and 5: finite
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10).read_meta(6)["faults"][
      "skipped"] == 2


def test_on_nonfinite_is_validated(tmp_path):
  assert tiny_config().train.on_nonfinite == "stop"
  for field, value, match in (("on_nonfinite", "ignore", r"train.on_nonfinite='ignore' is unknown; choose one "
                                                         r"of stop, rollback, skip"),
                              ("rollback_lr_factor", 1.5, r"rollback_lr_factor=1.5 must be in \(0, 1\)"),
                              ("nonfinite_limit", 0, r"nonfinite_limit=0 must be >= 1")):
    with pytest.raises(ValueError, match=match):
      trainer.train(tiny_config(**{field: value}), str(tmp_path / field))
    assert not os.path.exists(tmp_path / field)


def test_rollback_takes_the_early_stopping_state_back(tmp_path):
  """Evaluations every step, none improving on step 1's (min_delta 1), patience 5: step 2's evaluation is of
  parameters a rollback throws away (to checkpoint 1), so it does not count, and the run stops at step 6 (five
  in a row: 2..6), not at 5."""
  c = diverging_config(on_nonfinite="rollback", rollback_lr_factor=1e-31, eval_every=1, patience=5, min_delta=1.0)
  c.data.num_val = 8
  res = trainer.train(c, str(tmp_path))
  assert res["faults"]["rollbacks"] == 1
  assert (res["stopped_by"], res["step"], res["best_step"], res["test_step"]) == ("patience", 6, 1, 1)
