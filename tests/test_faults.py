"""Training under faults: SIGKILLs, divergence, failed saves, workdir files pointing outside, strict result JSON.

The runs share one tiny Mamba config (d_model 16, 1 block, L 32, 12 steps, a checkpoint every 3) and a
persistent compilation cache, which the killed subprocess runs read too.
"""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import tiny_train_config
from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import cli
from bmojo_jax.train import faults
from bmojo_jax.train import files
from bmojo_jax.train import metrics as metrics_lib
from bmojo_jax.train import optim as optim_lib
from bmojo_jax.train import runs
from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train import steps
from bmojo_jax.train import trainer
from bmojo_jax.train.data import tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 12


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(module_compilation_cache):
  """Every train() of this module reuses the programs compiled before (conftest)."""
  return module_compilation_cache


def tiny_config(**train):
  return tiny_train_config(**{"num_steps": NUM_STEPS, "async_checkpointing": True, **train})


def diverging_config(**train):
  """Step 1 has learning rate 0 (warmup); step 2's 2.5e29 blows the parameters up to finite values whose
  forward is NaN, while update 2's own loss is finite: the divergence on a checkpoint step of issue #21."""
  c = tiny_config(num_steps=6, checkpoint_every=1, async_checkpointing=False, **train)
  c.optim.update(learning_rate=1e30, warmup_steps=4, grad_clip_norm=0.0)
  return c


def losses(workdir):
  steps, values = metrics_lib.series(metrics_lib.read_metrics(workdir), "train", "loss")
  return dict(zip(steps, values))


def steps_of(workdir):
  return ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10).all_steps()


def strict_load(path):
  def refuse(name):
    raise ValueError(f"{path} holds {name}: not strict JSON")
  with open(path, encoding="utf-8") as f:
    return json.load(f, parse_constant=refuse)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run: (workdir, results)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  return workdir, trainer.train(tiny_config(), workdir)


def assert_same_run(workdir, results, reference):
  ref_dir, ref_results = reference
  assert sorted(losses(workdir)) == list(range(1, NUM_STEPS + 1))
  assert losses(workdir) == losses(ref_dir)                        # bit-exact, fp32 on CPU
  for key in ("step", "test_loss", "test_accuracy"):
    assert results[key] == ref_results[key], key


# ----------------------------------------------------------------------------------------------- SIGKILL
# One run of bmojo-train (tests/kill_child.py) killed again and again: ten SIGKILLs, five inside checkpoint saves,
# and a SIGTERM in the loop. (FAULT of kill_child.py, or "random:<step>" for a SIGKILL from here at a random moment
# once <step> is logged; the exit status; a line the process prints.)
KILLED, STOPPED = -signal.SIGKILL, 75
KILLS = [("save:3", KILLED, None),
         ("meta:3", KILLED, "Removed 3.orbax-checkpoint-tmp"),
         ("metrics:2", KILLED, None),
         ("tb:4", KILLED, None),
         ("save:6", KILLED, None),
         ("term:7", STOPPED, "bmojo-train: stopped by SIGTERM at step 7; exiting with status 75"),
         ("random:8", KILLED, "resuming from step 7"),
         ("meta:9", KILLED, None),
         ("save:12", KILLED, None),
         ("eval:0", KILLED, None),
         ("results:0", KILLED, None),
         ("", 0, "resuming from step 12")]
CONFIG_FILE = f"""from tests.conftest import tiny_train_config

def get_config():
  return tiny_train_config(num_steps={NUM_STEPS}, async_checkpointing=True)
"""


def snapshot(root, leave_out):
  """{path: (size, mtime)} of everything under `root` but the folder `leave_out`."""
  out = {}
  for folder, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if os.path.join(folder, d) != leave_out]
    for name in dirs + names:
      st = os.lstat(os.path.join(folder, name))
      out[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns)
  return out


def last_logged(workdir):
  """The highest step in metrics.jsonl (a line being written is left out)."""
  path = os.path.join(workdir, metrics_lib.METRICS_FILE)
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    return max([json.loads(line)["step"] for line in f if line.endswith("}\n")], default=0)


@pytest.mark.slow
def test_a_run_killed_eleven_times_ends_as_if_never_interrupted(reference, tmp_path, compilation_cache):
  """Each restart resumes (the children read the programs the reference run compiled, so compile nothing); the
  run ends bit-identical to the uninterrupted one, having touched nothing outside its workdir."""
  outside = tmp_path / "outside"               # the children's folder: the config file, their TMPDIR
  (outside / "tmp").mkdir(parents=True)
  (outside / "tiny.py").write_text(CONFIG_FILE)
  workdir = str(outside / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, CACHE=compilation_cache,
             TMPDIR=str(outside / "tmp"), PYTHONDONTWRITEBYTECODE="1")
  before, rng = snapshot(outside, workdir), random.Random(31)
  for fault, status, says in KILLS:
    kind, _, at = fault.partition(":")
    child = subprocess.Popen([sys.executable, "-m", "tests.kill_child", str(outside / "tiny.py"), workdir],
                             cwd=REPO, env=dict(env, FAULT="" if kind == "random" else fault),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if kind == "random":
      while child.poll() is None and last_logged(workdir) < int(at):
        time.sleep(0.01)
      time.sleep(rng.uniform(0.0, 0.05))
      child.kill()
    out = child.communicate(timeout=300)[0]
    assert child.returncode == status and "Traceback" not in out, (fault, out[-3000:])
    assert says is None or says in out, (fault, says, out[-3000:])
    assert status != STOPPED or len([l for l in out.splitlines() if l.startswith("bmojo-train:")]) == 1, out
  assert sum(status == KILLED for _, status, _ in KILLS) >= 10
  assert_same_run(workdir, strict_load(os.path.join(workdir, "results.json")), reference)
  assert not [p for p in os.listdir(os.path.join(workdir, "checkpoints")) if ckpt_lib.TMP_SUFFIX in p]
  assert not [p for p in os.listdir(workdir) if ".tmp" in p]
  assert snapshot(outside, workdir) == before and not os.listdir(outside / "tmp")


# ----------------------------------------------------------------------------------------------- divergence
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


# ----------------------------------------------------------------------------------------------- failed saves
def _failing_meta_writes(monkeypatch, step: int, code: int):
  """Makes the background write of checkpoint `step`'s meta item fail with OSError(code), as a full disk or a
  read-only folder would (the arrays of the step are written, the checkpoint is never finalized)."""
  original = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

  async def save_fn(self, x, directory):
    if isinstance(x, dict) and x.get("step") == step:
      raise OSError(code, os.strerror(code), str(directory / "metadata"))
    return await original(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", save_fn)


def test_an_unfinished_save_still_being_written_is_removed_on_a_retry(tmp_path, monkeypatch):
  """In the process whose save failed, Orbax may still land a file in the unfinished folder while the next
  Checkpointer removes it (CI: 'Directory not empty'); the removal retries instead of failing the run."""
  unfinished = tmp_path / f"6{ckpt_lib.TMP_SUFFIX}" / f"state{ckpt_lib.TMP_SUFFIX}"
  unfinished.mkdir(parents=True)
  (unfinished / "d").write_bytes(b"x")
  real_rmtree, calls = shutil.rmtree, []

  def racing_rmtree(path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 1:
      raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), str(unfinished))
    return real_rmtree(path, *args, **kwargs)

  monkeypatch.setattr(shutil, "rmtree", racing_rmtree)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2, async_save=False, writer=True)
  ckpt.close()
  assert len(calls) == 2 and ckpt.removed_unfinished == [f"6{ckpt_lib.TMP_SUFFIX}"]
  assert not (tmp_path / f"6{ckpt_lib.TMP_SUFFIX}").exists()


def test_a_removal_that_keeps_failing_is_raised(tmp_path, monkeypatch):
  (tmp_path / f"6{ckpt_lib.TMP_SUFFIX}").mkdir()

  def always_racing(path, *args, **kwargs):
    raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), path)

  monkeypatch.setattr(time, "sleep", lambda seconds: None)
  monkeypatch.setattr(shutil, "rmtree", always_racing)
  with pytest.raises(OSError, match="not empty"):
    ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2, async_save=False, writer=True)


@pytest.mark.slow
@pytest.mark.parametrize("async_save,code,cause", [(True, errno.ENOSPC, "no space left on device"),
                                                   (False, errno.EACCES, "permission denied")])
def test_a_failed_save_stops_at_that_save_in_a_few_lines(reference, tmp_path, monkeypatch, capfd, async_save,
                                                          code, cause):
  workdir = str(tmp_path)
  _failing_meta_writes(monkeypatch, 6, code)
  seen = []

  def slow_steps(step, state):   # gives the background save of step 6 time to fail before step 7 ends
    del state
    seen.append(step)
    time.sleep(0.3 if step == 7 else 0.0)

  capfd.readouterr()
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    trainer.train(tiny_config(async_checkpointing=async_save), workdir, step_callback=slow_steps)
  assert seen[-1] in ((6, 7) if async_save else (6,))   # at the failed save, or (asynchronous) one step later
  message = str(e.value)
  assert message == (f"Saving checkpoint 6 in {workdir}/checkpoints failed: {cause}.\nIntact checkpoints: 3; the "
                     "unfinished one is removed at the next start. "
                     f"{'Free some space' if code == errno.ENOSPC else 'Make it writable'} and rerun the same "
                     "command: it resumes from step 3.")
  noise = capfd.readouterr()
  assert len((noise.out + noise.err).splitlines()) < 10, noise.err[-3000:]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp"))
  monkeypatch.undo()                                # the disk is free again: rerun the same command
  results = trainer.train(tiny_config(async_checkpointing=async_save), workdir)
  out = capfd.readouterr().out
  assert "Removed 6.orbax-checkpoint-tmp" in out
  assert f"resuming from step 3 (checkpoint {workdir}/checkpoints/3)" in out
  assert_same_run(workdir, results, reference)


# ----------------------------------------------------------------------------------------------- restore choice
@pytest.mark.slow
def test_resume_from_skips_a_checkpoint_that_cannot_be_restored(reference, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  os.remove(os.path.join(workdir, "results.json"))
  for root, _, names in os.walk(os.path.join(workdir, "checkpoints", "12", "state")):
    for name in names:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    trainer.train(tiny_config(), workdir)
  message = str(e.value)
  assert len(message.splitlines()) <= 2 and "tensorstore_spec" not in message, message
  assert ("Intact older checkpoints: 9, 6, 3. To resume from step 9, rerun with --config.train.resume_from=9"
          in message)
  results = trainer.train(tiny_config(resume_from=9), workdir)
  out = capsys.readouterr().out
  assert f"checkpoints 12 moved to {workdir}/checkpoints_set_aside" in out
  assert f"resuming from step 9 (checkpoint {workdir}/checkpoints/9)" in out
  assert os.listdir(os.path.join(workdir, "checkpoints_set_aside")) == ["12"]
  assert_same_run(workdir, results, reference)
  assert trainer.train(tiny_config(resume_from=9), workdir) == results      # the same command again: finished
  out = capsys.readouterr().out
  assert "train.resume_from=9 was applied before" in out and "already finished at step 12" in out
  with pytest.raises(ckpt_lib.CheckpointError, match=r"resume_from=5: there is no checkpoint 5 .* intact "
                                                     r"checkpoints: 12, 9, 6, 3"):
    trainer.train(tiny_config(resume_from=5), workdir)


def test_a_run_stopped_at_its_target_accuracy_is_finished(tmp_path):
  path = str(tmp_path / "results.json")
  t = tiny_config(target_accuracy=0.9).train
  assert faults.finished(path, 12, t) is None
  with open(path, "w") as f:
    json.dump({"step": 6, "stopped_by": "target_accuracy", "test_accuracy": 0.95}, f)
  assert faults.finished(path, 6, t)[0] == "test accuracy 0.9500 >= train.target_accuracy=0.9"
  assert faults.finished(path, 9, t) is None                          # trained further since
  assert faults.finished(path, 6, tiny_config(target_accuracy=0.99).train) is None   # a higher target: go on
  assert faults.finished(path, 12, t) is None      # results of step 6 are not those of checkpoint 12: evaluate again
  for stop in ("SIGTERM", None):                    # a SIGTERM stop at 7, later killed before writing step 12's
    with open(path, "w") as f:
      json.dump({"step": 7 if stop else 12, "stopped_by": stop, "test_accuracy": 0.5}, f)
    assert faults.finished(path, 12, t) == (None if stop else ("train.num_steps=12", json.load(open(path))))


# ----------------------------------------------------------------------------------------------- workdir files
def test_a_workdir_file_cannot_point_outside(tmp_path):
  """tokenizer.json's model_file goes through files.inside: no absolute name, no `..` out of the workdir and no
  symbolic link, not even one that resolves inside the workdir (the rule of every file a run reads or writes)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (tmp_path / "outside.model").write_text("not a model")
  (workdir / "tokenizer.model").write_text("not a model either")
  os.symlink(tmp_path / "outside.model", workdir / "link.model")
  os.symlink(workdir / "tokenizer.model", workdir / "inner_link.model")
  root, source = re.escape(str(workdir)), re.escape(str(workdir / "tokenizer.json"))
  for name in ("../outside.model", str(tmp_path / "outside.model"), "sub/../../outside.model"):
    with pytest.raises(files.UnsafePathError, match=rf"^{source} names {re.escape(repr(name))}, which is outside "
                                                    rf"{root}; refusing to use it \(a folder's files may only name "
                                                    r"files inside it\)\.$"):
      tokenizers.from_description({"kind": "sentencepiece", "model_file": name}, str(workdir))
  for link, target in (("link.model", tmp_path / "outside.model"), ("inner_link.model", workdir / "tokenizer.model")):
    with pytest.raises(files.UnsafePathError, match=rf"^{re.escape(str(workdir / link))} is a symbolic link \(to "
                                                    rf"{re.escape(str(target))}\); refusing to follow it out of "
                                                    rf"{root}: the name in tokenizer.json must be a plain file or "
                                                    r"folder inside it\. Remove the link and rerun\.$"):
      tokenizers.from_description({"kind": "sentencepiece", "model_file": link}, str(workdir))
  assert files.inside(str(workdir), "tokenizer.model", "tokenizer.json") == str(workdir / "tokenizer.model")


# ----------------------------------------------------------------------------------------------- strict JSON
@pytest.mark.slow
def test_eval_writes_strict_json_warns_and_exits_non_zero(reference, tmp_path, compilation_cache):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  setup, _, step = runs.load_run(workdir)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10, async_save=False)
  state = setup_lib.restore_state(ckpt, step, setup, None)
  state["params"] = jax.tree.map(lambda x: x * jnp.nan, state["params"])   # a checkpoint of an older version
  ckpt.save(step + 1, state, None, runs.checkpoint_meta(setup))
  ckpt.close()
  with pytest.warns(runs.NonFiniteResultWarning, match=r"checkpoint 13 .* non-finite test_loss, "
                                                         r"test_perplexity; written as null"):
    result = runs.evaluate_run(workdir)
  assert result["test_loss"] is None and result["nonfinite"] == ["test_loss", "test_perplexity"]
  assert strict_load(os.path.join(workdir, "eval.json")) == result
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=compilation_cache)
  r = subprocess.run([sys.executable, "-m", "bmojo_jax.train.cli", "eval", "--workdir", workdir], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "bmojo-eval: warning: checkpoint 13" in r.stderr and '"test_loss": null' in r.stdout


# ----------------------------------------------------------------------------------------------- full disk
class _FullAfter:
  """A file whose writes fail with ENOSPC once `budget` writes went through (a disk that fills)."""

  def __init__(self, f, budget):
    self._f, self.budget = f, budget

  def write(self, data):
    self.budget -= 1
    if self.budget < 0:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return self._f.write(data)

  def __getattr__(self, name):
    return getattr(self._f, name)


def _fill_disk_under(monkeypatch, writer: str):
  """The disk fills under `writer` after its first few writes: metrics.jsonl or the TensorBoard event file at
  step 5 (log_every=1), results.json at its rename."""
  if writer == "metrics.jsonl":
    real = files.open_nofollow
    monkeypatch.setattr(files, "open_nofollow", lambda path, mode="r": _FullAfter(real(path, mode), 4)
                        if path.endswith(metrics_lib.METRICS_FILE) and mode == "a" else real(path, mode))
  elif writer == "tensorboard":
    real_init = metrics_lib._EventFile.__init__   # pylint: disable=protected-access

    def init(self, directory):
      real_init(self, directory)
      records = self._writer._py_recordio_writer    # pylint: disable=protected-access
      records._writer = _FullAfter(records._writer, 4 * 4 * 5)   # 4 writes an event; 1 + 5 scalars a step
    monkeypatch.setattr(metrics_lib._EventFile, "__init__", init)   # pylint: disable=protected-access
  else:
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
      if str(dst).endswith(writer):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
      return real_replace(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["metrics.jsonl", "tensorboard", "results.json"])
def test_a_full_disk_under_any_writer_stops_within_a_step_in_two_lines(reference, tmp_path, monkeypatch, writer):
  """No writer thread to die and hang the run (tensorboardX's did): the write fails in the loop, the run stops at
  that step with the cause and the intact checkpoints, and a rerun once the disk is free ends like a clean run."""
  workdir, seen = str(tmp_path), []
  _fill_disk_under(monkeypatch, writer)
  with pytest.raises(files.WriteError) as e:
    trainer.train(tiny_config(), workdir, step_callback=lambda step, state: seen.append(step))
  lines = str(e.value).splitlines()
  assert len(lines) == 2 and lines[0].startswith(f"Writing {workdir}/{writer}") and \
      lines[0].endswith("failed: no space left on device."), lines
  intact = "12, 9, 6, 3" if writer == "results.json" else "3"
  assert lines[1] == (f"Intact checkpoints: {intact}. Free some space and rerun the same command: it resumes from "
                      f"step {intact.split(',')[0]}.")
  assert seen[-1] == (NUM_STEPS if writer == "results.json" else 5)
  assert not [p for p in os.listdir(workdir) if ".tmp" in p]
  if writer == "metrics.jsonl":
    monkeypatch.undo()
    assert_same_run(workdir, trainer.train(tiny_config(), workdir), reference)


@pytest.mark.slow
def test_a_full_disk_under_eval_json_is_two_lines_and_leaves_no_part(reference, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  _fill_disk_under(monkeypatch, "eval.json")
  with pytest.raises(files.WriteError) as e:
    runs.evaluate_run(workdir)
  assert not os.path.exists(os.path.join(workdir, "eval.json")) and not [p for p in os.listdir(workdir) if ".tmp" in p]
  monkeypatch.setattr(cli, "_DEBUG", types.SimpleNamespace(value=False))    # absl's flags are not parsed here
  with pytest.raises(SystemExit) as stopped:
    with cli._one_line_errors("bmojo-eval"):   # pylint: disable=protected-access
      raise e.value
  assert str(stopped.value.code).splitlines() == [
      f"bmojo-eval: Writing {workdir}/eval.json failed: no space left on device.",
      "Free some space and rerun the same command."]


def test_an_unreadable_results_file_is_named_with_the_fix(tmp_path):
  path = tmp_path / "results.json"
  for text, why in (("", "it is empty"), ('{"step": 1', "it is not valid JSON")):
    path.write_text(text)
    with pytest.raises(files.UnreadableFileError, match=rf"{path} cannot be read: {why}.*Delete it \(or move it "
                                                        r"away\) and rerun the same command"):
      faults.finished(str(path), 3, tiny_config().train)


def test_json_files_are_written_by_rename(tmp_path):
  path = str(tmp_path / "r.json")
  files.write_json(path, {"a": 1})
  with pytest.raises(TypeError):
    files.write_json(path, {"a": object()})
  assert json.loads(open(path).read()) == {"a": 1} and os.listdir(tmp_path) == ["r.json"]
  (tmp_path / "r.json.tmp123").write_text('{"a": ')       # a writer killed before its rename
  (tmp_path / "r.json.tmp.keep").write_text("not ours")
  files.write_json(path, {"a": 2})
  assert sorted(os.listdir(tmp_path)) == ["r.json", "r.json.tmp.keep"]


def test_a_metrics_line_torn_by_a_kill_is_cut_when_the_run_resumes(tmp_path):
  path = tmp_path / metrics_lib.METRICS_FILE
  path.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "tr')
  writer = metrics_lib.MetricWriter(str(tmp_path), total_steps=3, initial_step=1, progress_bar=False)
  writer.write(2, {"loss": 1.5})
  writer.close()
  assert [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(str(tmp_path))] == [(1, 2.0), (2, 1.5)]


# ----------------------------------------------------------------------------------------------- signals
@pytest.mark.slow
def test_sigterm_resume_logs_what_an_uninterrupted_run_logs(tmp_path):
  """log_every 4, checkpoints every 3: SIGTERM at step 5 saves checkpoint 5 with the unlogged updates 5 (after
  logged step 4), and the resumed run logs step 8's average over 5..8, exactly as the uninterrupted run does."""
  config = tiny_config(log_every=4)
  whole = str(tmp_path / "whole")
  trainer.train(config, whole)
  workdir = str(tmp_path / "stopped")
  stop_at_5 = lambda step, state: signal.raise_signal(signal.SIGTERM) if step == 5 else None
  first = trainer.train(config, workdir, step_callback=stop_at_5)
  assert first["stopped_by"] == "SIGTERM" and first["step"] == 5
  assert sorted(losses(workdir)) == [4]                         # no partial interval logged at the stop
  trainer.train(config, workdir)
  with open(os.path.join(whole, metrics_lib.METRICS_FILE)) as f1, \
       open(os.path.join(workdir, metrics_lib.METRICS_FILE)) as f2:
    drop = lambda r: {k: v for k, v in r.items() if k != "tokens_per_s"}
    assert [drop(json.loads(l)) for l in f1] == [drop(json.loads(l)) for l in f2]


def test_sigterm_before_the_first_step_stops_with_a_message(tmp_path, capsys):
  stop = trainer.StopRequest()
  stop(signal.SIGTERM)
  results = trainer.train(tiny_config(), str(tmp_path), stop=stop)
  assert results["stopped_by"] == "SIGTERM" and results["step"] == 0
  assert "SIGTERM received before the first step: no checkpoint was written; rerun the same command to resume." \
      in capsys.readouterr().out
  assert steps_of(str(tmp_path)) == []


# ----------------------------------------------------------------------------------------------- planted links
@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "tensorboard", "checkpoints", "results.json"])
def test_a_planted_link_in_the_workdir_is_refused_and_its_target_untouched(tmp_path, name):
  workdir, outside = tmp_path / "run", tmp_path / "precious"
  workdir.mkdir()
  outside.mkdir() if name in ("tensorboard", "checkpoints") else outside.write_text("keep me")
  os.symlink(outside, workdir / name)
  with pytest.raises((files.UnsafePathError, ckpt_lib.CheckpointError), match="symbolic link") as e:
    trainer.train(tiny_config(), str(workdir))
  assert len(str(e.value).splitlines()) <= 2, str(e.value)
  assert (os.listdir(outside) == [] if outside.is_dir() else outside.read_text() == "keep me")


def test_run_files_refuse_a_planted_link_and_leave_its_target(reference, tmp_path):
  """A link planted at config.json or eval.json is neither written through nor read."""
  workdir, outside = str(tmp_path / "run"), tmp_path / "precious"
  shutil.copytree(reference[0], workdir)
  outside.write_text("keep me")
  for name in ("config.json", "eval.json"):
    real = os.path.join(workdir, name)
    if os.path.lexists(real):
      os.rename(real, real + ".real")
    os.symlink(outside, real)
    with pytest.raises(files.UnsafePathError, match=f"{name} is a symbolic link"):
      runs.write_run_files(workdir, tiny_config(), None) if name == "config.json" else \
          runs.evaluate_run(workdir)
    if name == "config.json":
      with pytest.raises(files.UnsafePathError, match="config.json is a symbolic link"):
        runs.load_config(workdir)
      os.remove(real)
      os.rename(real + ".real", real)
  assert outside.read_text() == "keep me"


def test_a_symlinked_checkpoint_is_refused_naming_the_intact_ones(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir, symlinks=True)
  os.remove(os.path.join(workdir, "results.json"))
  step12 = os.path.join(workdir, "checkpoints", "12")
  shutil.move(step12, tmp_path / "elsewhere")
  os.symlink(tmp_path / "elsewhere", step12)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"is a symbolic link .*\n.*Intact older checkpoints: 9, 6, 3"):
    trainer.train(tiny_config(), workdir)
  unfinished = os.path.join(workdir, "checkpoints", f"15{ckpt_lib.TMP_SUFFIX}")
  os.remove(step12)
  os.symlink(tmp_path / "elsewhere", unfinished)           # a planted "unfinished save": only the link goes
  ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10, writer=True).close()
  assert not os.path.lexists(unfinished) and os.listdir(tmp_path / "elsewhere")


# ----------------------------------------------------------------------------------------------- bit rot
def test_checksums_see_one_changed_word_and_a_swap():
  x = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
  state = {"a": x, "b": x.astype(jnp.bfloat16), "c": jnp.int32(7), "d": x.astype(jnp.float64)
           if jax.config.jax_enable_x64 else x}
  base = ckpt_lib.checksums(state)
  assert base == ckpt_lib.checksums(jax.tree.map(np.asarray, state))
  assert ckpt_lib.checksums({**state, "a": x.at[1, 2].add(1e-6)})["['a']"] != base["['a']"]
  assert ckpt_lib.checksums({**state, "a": x[::-1]})["['a']"] != base["['a']"]


@pytest.mark.slow
def test_bit_rot_in_an_array_file_is_refused_naming_the_intact_ones(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  os.remove(os.path.join(workdir, "results.json"))
  state_dir = os.path.join(workdir, "checkpoints", "12", "state")
  arrays = [os.path.join(root, n) for root, _, names in os.walk(state_dir) for n in names
            if os.sep + "d" + os.sep in os.path.join(root, n)]
  largest = max(arrays, key=os.path.getsize)
  rng = random.Random(31)
  with open(largest, "r+b") as f:
    f.seek(os.path.getsize(largest) // 3)
    f.write(bytes(rng.getrandbits(8) for _ in range(min(4096, os.path.getsize(largest) // 3))))
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    trainer.train(tiny_config(), workdir)
  assert len(str(e.value).splitlines()) <= 2 and "Intact older checkpoints: 9, 6, 3" in str(e.value), str(e.value)


@pytest.mark.parametrize("part, damage", [("meta/metadata", "empty"), ("meta", "remove"), ("state", "remove"),
                                          ("state/_METADATA", "garbage"), ("state/manifest.ocdbt", "empty"),
                                          ("array", "empty"), ("array", "link")])
def test_a_damaged_checkpoint_is_refused_in_two_lines_naming_the_intact_ones(reference, tmp_path, part, damage):
  """Checkpoint 12 with one part removed, emptied, overwritten or moved out and linked to: the run stops before
  training, in two lines, and reads nothing through the link."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  os.remove(os.path.join(workdir, "results.json"))
  step12 = os.path.join(workdir, "checkpoints", "12")
  path = os.path.join(step12, part)
  if part == "array":            # the largest array file
    path = max((os.path.join(root, n) for root, _, names in os.walk(os.path.join(step12, "state")) for n in names
                if os.sep + "d" + os.sep in os.path.join(root, n)), key=os.path.getsize)
  if damage == "remove":
    shutil.rmtree(path)
  elif damage == "link":
    shutil.move(path, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", path)
  else:
    with open(path, "wb") as f:
      f.write(b"" if damage == "empty" else b"garbage")
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    trainer.train(tiny_config(), workdir)
  lines = str(e.value).splitlines()
  assert len(lines) == 2 and lines[0].startswith(f"Checkpoint {step12} "), lines
  assert lines[1].startswith("It was left untouched. Intact older checkpoints: 9, 6, 3."), lines


@pytest.mark.slow
def test_arrays_that_read_fine_but_differ_from_their_checksums_are_refused(reference, tmp_path):
  """Bit rot that the storage format does not catch (what random bytes in an uncompressed chunk give): checkpoint
  12's state folder replaced by a well-formed one holding other values."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  setup = setup_lib.build(tiny_config())
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10, async_save=False)
  state = setup_lib.restore_state(ckpt, 12, setup, None)
  ckpt.close()
  rotten = ckpt_lib.Checkpointer(str(tmp_path / "rotten"), max_to_keep=1, async_save=False)
  rotten.save(12, {**state, "step": state["step"] + 1}, None, runs.checkpoint_meta(setup))
  rotten.close()
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12", "state"))
  shutil.copytree(tmp_path / "rotten" / "12" / "state", os.path.join(workdir, "checkpoints", "12", "state"))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoints/12 is corrupt: 1 array\(s\) differ from the "
                                                     r"checksums saved with them \(\['step'\]\)\.\nIt was left "
                                                     r"untouched\. Intact older checkpoints: 9, 6, 3"):
    runs.load_run(workdir)


@pytest.mark.slow
def test_sigterm_after_the_last_step_stops_with_status_75_and_a_rerun_finishes(tmp_path, monkeypatch):
  """After the loop (the last checkpoint saved and evaluated) a signal stops the run where it is (LateStop, exit 75
  in bmojo-train) without a results.json; a rerun evaluates the checkpoint and writes it."""
  workdir, write = str(tmp_path), runs.write_strict_json

  def interrupted(*args, **kwargs):
    signal.raise_signal(signal.SIGTERM)
    return write(*args, **kwargs)
  monkeypatch.setattr(runs, "write_strict_json", interrupted)
  with pytest.raises(trainer.LateStop, match=rf"^SIGTERM received after the last step: checkpoint {NUM_STEPS} is "
                                             r"saved; rerun the same command to evaluate it and write results.json.$"):
    trainer.train(tiny_config(), workdir)
  assert not os.path.exists(os.path.join(workdir, "results.json")) and steps_of(workdir)[-1] == NUM_STEPS
  monkeypatch.undo()
  results = trainer.train(tiny_config(), workdir)
  assert results["step"] == NUM_STEPS and results["stopped_by"] is None and np.isfinite(results["test_loss"])


def test_a_config_json_edited_to_read_other_data_is_refused(reference, tmp_path):
  """data.paths=/etc planted in a workdir's config.json: evaluation reads nothing there."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  path = os.path.join(workdir, "config.json")
  config = json.loads(open(path).read())
  config["data"].update(kind="text", paths="/etc")
  files.write_json(path, config)
  with pytest.raises(ValueError, match=r"config.json was changed after training: data.kind: 'text' here, 'mqar' in "
                                       r"training; data.paths: '/etc' here, .*Put it back, or pass --config FILE"):
    runs.evaluate_run(workdir)


def test_rollback_takes_the_early_stopping_state_back(tmp_path):
  """Evaluations every step, none improving on step 1's (min_delta 1), patience 5: step 2's evaluation is of
  parameters a rollback throws away (to checkpoint 1), so it does not count, and the run stops at step 6 (five
  in a row: 2..6), not at 5."""
  c = diverging_config(on_nonfinite="rollback", rollback_lr_factor=1e-31, eval_every=1, patience=5, min_delta=1.0)
  c.data.num_val = 8
  res = trainer.train(c, str(tmp_path))
  assert res["faults"]["rollbacks"] == 1
  assert (res["stopped_by"], res["step"], res["best_step"], res["test_step"]) == ("patience", 6, 1, 1)
