"""Training interrupted (issue #21): a run of bmojo-train SIGKILLed eleven times ends as if never interrupted;
SIGTERM before the first step, inside the loop and after the last step stops cleanly and a rerun resumes.
Runs of tests/train_runs.py's tiny config; the killed subprocesses read the training tests' compilation cache."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.train_runs import NUM_STEPS, REPO, assert_same_run, losses, steps_of, strict_load, tiny_config
from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import metrics as metrics_lib
from bmojo_jax.train import runs
from bmojo_jax.train import trainer


# Every train() here reuses the programs compiled before, here or in another module of tiny_train_config runs.
pytestmark = pytest.mark.usefixtures("train_compilation_cache")


# ----------------------------------------------------------------------------------------------------- SIGKILL
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
def test_a_run_killed_eleven_times_ends_as_if_never_interrupted(reference, tmp_path, train_compilation_cache):
  """Each restart resumes (the children read the programs the reference run compiled, so compile nothing); the
  run ends bit-identical to the uninterrupted one, having touched nothing outside its workdir."""
  outside = tmp_path / "outside"               # the children's folder: the config file, their TMPDIR
  (outside / "tmp").mkdir(parents=True)
  (outside / "tiny.py").write_text(CONFIG_FILE)
  workdir = str(outside / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, CACHE=train_compilation_cache,
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



# ----------------------------------------------------------------------------------------------------- signals
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
