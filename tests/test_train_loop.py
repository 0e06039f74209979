"""End-to-end training runs on CPU: what a run writes, exact resume after SIGTERM, resume across layouts (the
flat compute config, the block loop to scanned blocks), a NaN loss, failures before training, one run per workdir.

All runs share tiny_train_config (d_model 16, L 32) and the training tests' persistent compilation cache, so each
program compiles once.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from bmojo_jax import ConfigError
from bmojo_jax.configs import lm
from tests.conftest import tiny_train_config
from tests.train_runs import losses, snapshot
from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import runs
from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train import steps
from bmojo_jax.train import trainer
from bmojo_jax.train.workdir_lock import WorkdirBusyError

# Every train() here reuses the programs compiled before, here or in another module of tiny_train_config runs.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("train_compilation_cache")]


tiny_config = tiny_train_config


def test_full_run_writes_everything(full_run):
  workdir, results = full_run
  assert results["step"] == 8 and results["stopped_by"] is None
  for name in ("config.json", "tokenizer.json", "metrics.jsonl", "results.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  for key in ("test_accuracy", "wall_s", "tokens_per_s", "device", "jax_version"):
    assert key in saved
  assert saved["data"]["L"] == 32 and saved["data"]["N"] == 4 and 0.0 <= saved["data"]["fraction_beyond_window"] <= 1
  assert sorted(losses(workdir)) == list(range(1, 9))
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10).all_steps() == [3, 6, 8]


def test_sigterm_saves_and_resume_is_exact(full_run, tmp_path, capsys):
  """Stop at step 4 by a real SIGTERM (handler installed by train), rerun: losses equal the uninterrupted run."""
  full_dir, _ = full_run
  workdir = str(tmp_path)

  def send_sigterm(step, state):
    del state
    if step == 4:
      signal.raise_signal(signal.SIGTERM)

  first = trainer.train(tiny_config(), workdir, step_callback=send_sigterm)
  assert first["stopped_by"] == "SIGTERM" and first["step"] == 4
  steps = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10).all_steps()
  assert steps == [3, 4]   # step 4 is the SIGTERM save (checkpoint_every is 3)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or not isinstance(
      signal.getsignal(signal.SIGTERM), trainer.StopRequest)   # handler restored
  capsys.readouterr()
  second = trainer.train(tiny_config(), workdir)
  assert second["step"] == 8
  assert f"resuming from step 4 (checkpoint {workdir}/checkpoints/4)" in capsys.readouterr().out
  expected, got = losses(full_dir), losses(workdir)
  assert sorted(got) == list(range(1, 9))
  for s in range(1, 9):
    assert got[s] == expected[s], (s, got[s], expected[s])   # bit-exact, fp32 on CPU
  assert second["test_loss"] == full_run[1]["test_loss"]


def test_workdir_of_the_flat_compute_layout_evaluates_and_resumes(full_run, tmp_path, capsys):
  """A workdir written before ModelConfig.compute (config.json and checkpoint meta with the compute fields flat
  under "model", no mesh.logical_axis_rules: made here by hand) is read in the current layout: it evaluates to
  the same loss, and resuming from step 6 gives the uninterrupted run's result."""
  workdir = str(tmp_path / "old")
  shutil.copytree(full_run[0], workdir)
  flat = lambda model: {**{k: v for k, v in model.items() if k != "compute"}, **model["compute"]}
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["model"] = flat(config["model"])
  del config["mesh"]["logical_axis_rules"]
  with open(path, "w") as f:
    json.dump(config, f)
  for step in (3, 6, 8):
    path = os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")
    with open(path) as f:
      meta = json.load(f)
    meta["model"] = flat(meta["model"])
    with open(path, "w") as f:
      json.dump(meta, f)
  assert "scan_impl" in meta["model"] and "compute" not in meta["model"]
  setup, params, step = runs.load_run(workdir)
  assert step == 8 and setup.cfg == setup_lib.model_config(tiny_config())
  assert runs.evaluate_run(workdir)["test_loss"] == full_run[1]["test_loss"]
  resume = tiny_config()
  resume.train.resume_from = 6
  capsys.readouterr()
  result = trainer.train(resume, workdir)
  assert f"resuming from step 6 (checkpoint {workdir}/checkpoints/6)" in capsys.readouterr().out
  assert result["step"] == 8 and result["test_loss"] == full_run[1]["test_loss"]
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10).read_meta(8)["model"] == \
      ckpt_lib.model_config_dict(setup.cfg)          # written again in the current layout


def test_checkpoint_of_the_block_loop_resumes_with_scanned_blocks(full_run, tmp_path):
  """A run written with the block loop (scan_layers=False, the default, and every run before scanned blocks)
  resumes with scanned blocks: parameters and optimizer state are converted on restore, and since both layouts
  initialize alike, the losses follow the uninterrupted run's; the scanned checkpoint evaluates with the loop."""
  workdir = str(tmp_path)
  stop_at_4 = lambda step, state: signal.raise_signal(signal.SIGTERM) if step == 4 else None
  first = trainer.train(tiny_config(), workdir, step_callback=stop_at_4)
  assert first["step"] == 4
  meta = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10).read_meta(4)
  assert meta["model"]["compute"]["scan_layers"] is False
  scanned = tiny_config()
  scanned.model.compute.scan_layers = True
  second = trainer.train(scanned, workdir)
  assert second["step"] == 8
  meta = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10).read_meta(8)
  assert meta["model"]["compute"]["scan_layers"] is True
  expected, got = losses(full_run[0]), losses(workdir)
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)], rtol=1e-5)
  np.testing.assert_allclose(runs.evaluate_run(workdir, tiny_config())["test_loss"], second["test_loss"],
                             rtol=1e-5)


def test_rerunning_a_finished_run_keeps_its_results(copied_run, capsys):
  before = snapshot(copied_run)
  with open(os.path.join(copied_run, "results.json")) as f:
    saved = json.load(f)
  again = trainer.train(tiny_config(), copied_run)
  assert again == saved and snapshot(copied_run) == before
  assert "already finished at step 8" in capsys.readouterr().out


def test_nan_loss_stops_naming_the_step(tmp_path):
  """Update 1 has learning rate 0 (warmup); update 2 blows the parameters up: their forward is NaN, so step 2 is
  not saved, and the last good checkpoint (1) gives a finite loss (not only finite parameters)."""
  c = tiny_config(num_steps=6, checkpoint_every=1)
  c.optim.update(learning_rate=1e30, warmup_steps=4, grad_clip_norm=0.0)
  workdir = str(tmp_path)
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step (\d+).*last good checkpoint is step") as e:
    trainer.train(c, workdir)
  bad_step = int(e.value.args[0].split("at step ")[1].split(":")[0])
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10)
  assert ckpt.latest_step() == bad_step - 1
  assert f"last good checkpoint is step {bad_step - 1}" in str(e.value)
  # The last good checkpoint restores, with finite parameters.
  setup, params, step = runs.load_run(workdir)
  assert step == bad_step - 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  assert np.isfinite(steps.evaluate(setup, params)["loss"])


def test_early_failures_before_training(tmp_path):
  # Data ids beyond the model vocabulary.
  c = tiny_config()
  c.data.vocab_size = 512
  with pytest.raises(ValueError, match=r"token ids up to 511 but model.vocab_size=256"):
    trainer.train(c, str(tmp_path / "a"))
  # Missing text path.
  c = lm.get_config("mamba")
  c.data.paths = str(tmp_path / "no_such_dir")
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    trainer.train(c, str(tmp_path / "b"))
  # Impossible model and train configs.
  c = tiny_config()
  c.model.n_layers = 3
  with pytest.raises(ConfigError, match="n_layers=3"):
    trainer.train(c, str(tmp_path / "c"))
  c = tiny_config(grad_accum_steps=3)
  with pytest.raises(ValueError, match="batch_size=4 is not divisible by train.grad_accum_steps=3"):
    trainer.train(c, str(tmp_path / "d"))
  c = tiny_config()
  c.mesh.tensor = 3
  with pytest.raises(ValueError, match=r"needs 3 devices|not divisible by 3"):
    trainer.train(c, str(tmp_path / "e"))
  for name in "abcde":
    assert not os.path.exists(tmp_path / name)   # validation comes before the workdir is created


def test_out_of_range_token_ids_fail_before_training(tmp_path):
  """A source yielding ids >= vocab_size is caught on the first batch, before any update."""
  setup = setup_lib.build(tiny_config())
  bad = {"inputs": np.full((2, 32), 300, np.int32), "targets": np.full((2, 32), -100, np.int32)}
  from bmojo_jax.train import tasks
  with pytest.raises(ValueError, match=r"'inputs' has token ids in \[300, 300\].*vocab_size=256"):
    tasks.check_batch(bad, setup.cfg.vocab_size, "training batch of step 1")


def test_one_run_per_workdir_and_a_dead_holders_lock_is_taken_over(copied_run):
  """A second live run on a workdir is refused before it writes anything, naming the holder; once the holder
  dies (SIGKILL: no cleanup), the next run takes the workdir over."""
  before = snapshot(copied_run)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from bmojo_jax.train.workdir_lock import WorkdirLock; "
       "WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", copied_run],
      stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirBusyError, match=rf"in use by another run \(host .*, pid {holder.pid}, started"):
      trainer.train(tiny_config(), copied_run)
    assert {k: v for k, v in snapshot(copied_run).items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}
  finally:
    holder.kill()
    holder.wait()
  assert trainer.train(tiny_config(), copied_run)["step"] == 8      # the finished run, read back
  assert snapshot(copied_run) == before
