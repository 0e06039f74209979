"""End-to-end training runs on CPU: resume exactness, SIGTERM, bad checkpoints, NaN, early failures, CLI.

All runs share one tiny Mamba config (d_model 16, 1 block, L 32) and a persistent compilation cache, so each
program compiles once for the module.
"""

import hashlib
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
from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import metrics as metrics_lib
from bmojo_jax.train import runs
from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train import steps
from bmojo_jax.train import trainer
from bmojo_jax.train.workdir_lock import WorkdirBusyError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(module_compilation_cache):
  """Every train() of this module reuses the programs compiled before (conftest)."""
  return module_compilation_cache


tiny_config = tiny_train_config


def losses(workdir):
  steps, values = metrics_lib.series(metrics_lib.read_metrics(workdir), "train", "loss")
  return dict(zip(steps, values))


def snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  results = trainer.train(tiny_config(), workdir)
  return workdir, results


@pytest.fixture
def copied_run(full_run, tmp_path):
  """A private copy of the finished run's workdir, for tests that damage or reuse it."""
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)
  return workdir


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


def assert_refused_untouched(workdir, match, config=None):
  """Training `config` (default: the tiny one) into `workdir` fails with a CheckpointError matching `match` and
  changes no file there."""
  before = snapshot(workdir)
  with pytest.raises(ckpt_lib.CheckpointError, match=match):
    trainer.train(config or tiny_config(), workdir)
  assert snapshot(workdir) == before


def test_corrupt_checkpoint_is_refused_and_untouched(copied_run):
  meta = os.path.join(copied_run, "checkpoints", "8", "meta", "metadata")
  assert os.path.exists(meta), os.listdir(os.path.dirname(meta))
  with open(meta, "w") as f:
    f.write("{not json")
  assert_refused_untouched(copied_run, r"checkpoints/8.*unreadable")


def test_corrupt_state_files_are_refused_and_untouched(copied_run):
  state_dir = os.path.join(copied_run, "checkpoints", "8", "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  assert_refused_untouched(copied_run, r"checkpoints/8.*could not be restored")
  with pytest.raises(ckpt_lib.CheckpointError) as err:
    trainer.train(tiny_config(), copied_run)
  message = str(err.value)
  assert len(message.splitlines()) <= 3 and len(message) < 1200, message
  assert "Intact older checkpoints: 6, 3. To resume from step 6, rerun with --config.train.resume_from=6" in message
  # Moving the bad checkpoint aside by hand works too: training resumes from step 6.
  bad = os.path.join(copied_run, "checkpoints", "8")
  shutil.move(bad, os.path.join(copied_run, "checkpoints_set_aside_8"))
  assert trainer.train(tiny_config(), copied_run)["step"] == 8


def test_incompatible_checkpoint_names_the_field(copied_run):
  c = tiny_config()
  c.model.d_model = 32
  assert_refused_untouched(copied_run, r"different model.*d_model: checkpoint 16, config 32", config=c)
  with pytest.raises(ckpt_lib.CheckpointError, match="d_model"):
    runs.evaluate_run(copied_run, c)


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


def _cli(*args, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "bmojo_jax.train.cli", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def test_cli_train_eval(tmp_path, compilation_cache):
  workdir = str(tmp_path / "cli")
  overrides = ["--config.model.d_model=16", "--config.model.n_layers=2", "--config.model.d_state=4",
               "--config.data.seq_len=32", "--config.data.num_kv_pairs=4", "--config.data.num_train=64",
               "--config.data.num_test=8", "--config.train.num_steps=3", "--config.train.batch_size=4",
               "--config.train.eval_batch_size=8", "--config.train.progress_bar=false",
               "--config.train.plot=false"]
  env = {"JAX_COMPILATION_CACHE_DIR": compilation_cache}
  r = _cli("train", "--config", "configs/mqar.py:mamba", "--workdir", workdir, *overrides, env_extra=env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "test accuracy" in r.stdout
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["step"] == 3
  r = _cli("eval", "--workdir", workdir, env_extra=env)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    ev = json.load(f)
  assert ev["step"] == 3 and ev["test_examples"] == 8 and 0.0 <= ev["test_accuracy"] <= 1.0
  r = _cli("eval", "--workdir", str(tmp_path / "missing"), env_extra=env)
  assert r.returncode != 0 and "No config.json" in r.stderr


def test_generate_from_run(full_run, tmp_path):
  from bmojo_jax.train import generate
  out = generate.generate_from_run(full_run[0], "3 130 5", max_new_tokens=4)
  ids = [int(x) for x in out.split()]
  assert len(ids) == 4 and all(0 <= i < 256 for i in ids)
  assert generate.generate_from_run(full_run[0], "3 130 5", max_new_tokens=4, prefill_chunk=2) == out
  with pytest.raises(ValueError, match="vocab_size is 256"):
    generate.generate_from_run(full_run[0], "3 999", max_new_tokens=2)
  with pytest.raises(ValueError, match="token ids separated by spaces"):
    generate.generate_from_run(full_run[0], "hello", max_new_tokens=2)
  with pytest.raises(FileNotFoundError, match="No config.json"):
    generate.generate_from_run(str(tmp_path), "1", max_new_tokens=2)


def test_load_model_is_the_latest_checkpoint(full_run):
  """runs.load_model, what generation and language-model evaluation read: the latest checkpoint's parameters in
  the run's model (a compute choice overridden, one that changes parameters refused), no tokenizer for MQAR."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from bmojo_jax.train import lm_eval  # pylint: disable=g-import-not-at-top
  _, params, step = runs.load_run(full_run[0])
  model, tokenizer, config, loaded_step = runs.load_model(full_run[0], {"compute.scan_impl": "associative"})
  assert loaded_step == step == 8 and tokenizer is None and config.to_dict() == runs.load_config(full_run[0]).to_dict()
  assert model.cfg.compute.scan_impl == "associative"
  for x, y in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="change the parameters"):
    runs.load_model(full_run[0], {"d_state": 2})
  with pytest.raises(ValueError, match="is not a text run"):
    lm_eval.evaluate_lm_run(full_run[0])


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


def test_curves_png_and_the_plot_command(copied_run):
  from bmojo_jax.train import plots  # pylint: disable=g-import-not-at-top
  path = plots.maybe_plot(copied_run)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  out = subprocess.run([sys.executable, "-m", "bmojo_jax.train.plots", "/no/such/run"], cwd=REPO, capture_output=True,
                       text=True)
  assert out.returncode != 0 and "usage: python -m bmojo_jax.train.plots WORKDIR" in out.stderr


def test_cli_sigterm_exits_75_and_labels_figures_with_their_step(tmp_path, compilation_cache):
  """A real SIGTERM to bmojo-train: the step in flight finishes, a checkpoint is saved, the process exits with
  75 (EX_TEMPFAIL) so schedulers can requeue, and results.json gives the step of its test figures."""
  import time  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "cli"
  overrides = ["--config.model.d_model=16", "--config.model.n_layers=2", "--config.model.d_state=4",
               "--config.data.seq_len=32", "--config.data.num_kv_pairs=4", "--config.data.num_train=64",
               "--config.data.num_test=8", "--config.train.num_steps=100000", "--config.train.batch_size=4",
               "--config.train.eval_batch_size=8", "--config.train.eval_every=5", "--config.train.log_every=5",
               "--config.train.progress_bar=false", "--config.train.plot=false"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=compilation_cache)
  proc = subprocess.Popen([sys.executable, "-m", "bmojo_jax.train.cli", "train", "--config", "configs/mqar.py:mamba",
                           "--workdir", str(workdir), *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
  while time.time() < deadline and not (metrics.exists() and '"eval"' in metrics.read_text()):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 75, stderr[-3000:]
  assert "stopped by SIGTERM" in stderr
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["stopped_by"] == "SIGTERM" and results["step"] < 100000
  assert results["test_step"] % 5 == 0 and results["test_step"] <= results["step"]


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
