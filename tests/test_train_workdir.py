"""A trained run's workdir read back on CPU: damaged or incompatible checkpoints refused and left untouched,
generation, runs.load_model, the curves, and the commands (bmojo-train, bmojo-eval, SIGTERM to bmojo-train).

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

from tests.conftest import cache_env, tiny_train_config
from tests.train_runs import REPO, snapshot
from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import runs
from bmojo_jax.train import trainer

# Every train() here reuses the programs compiled before, here or in another module of tiny_train_config runs.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("train_compilation_cache")]


tiny_config = tiny_train_config


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


def test_generate_from_run(full_run, tmp_path):
  from bmojo_jax.train import generate
  out = generate.generate_from_run(full_run[0], "3 130 5", max_new_tokens=4)
  ids = [int(x) for x in out.split()]
  assert len(ids) == 4 and all(0 <= i < 256 for i in ids)
  assert generate.generate_from_run(full_run[0], "3 130 5", max_new_tokens=4, prefill_chunk=2) == out
  assert generate.generate_from_run(full_run[0], "3 130 5", max_new_tokens=4, kernel_layout="out_in") == out
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


def test_a_checkpoint_restores_in_the_other_kernel_layout(full_run):
  """A checkpoint written in_out restores under compute.kernel_layout=out_in (with the block layout changed too):
  the same loss, every kernel a transposition of the written one (the same entries), the rest as written; the
  optimizer state converted alike (restore_state puts it in the out_in setup's shapes and shardings)."""
  from bmojo_jax.train import setup as setup_lib, steps  # pylint: disable=g-import-not-at-top
  setup, params, _ = runs.load_run(full_run[0])
  assert setup.cfg.compute.kernel_layout == "in_out"
  loss = steps.evaluate(setup, params)["loss"]
  for scan in (setup.cfg.compute.scan_layers, not setup.cfg.compute.scan_layers):
    out_setup, out_params, step = runs.load_run(
        full_run[0], overrides={"compute.kernel_layout": "out_in", "compute.scan_layers": scan})
    assert out_setup.cfg.compute.kernel_layout == "out_in"
    np.testing.assert_allclose(steps.evaluate(out_setup, out_params)["loss"], loss, rtol=1e-5)
    if scan == setup.cfg.compute.scan_layers:
      reshaped = 0
      for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(out_params)):
        x, y = np.asarray(x), np.asarray(y)
        if jax.tree_util.keystr(path).endswith("['kernel']"):
          reshaped += x.shape != y.shape
          np.testing.assert_array_equal(np.sort(x, axis=None), np.sort(y, axis=None))
        else:
          np.testing.assert_array_equal(x, y)
      assert reshaped > 0
    ckpt = ckpt_lib.Checkpointer(os.path.join(full_run[0], "checkpoints"), max_to_keep=10, async_save=False)
    try:
      state = setup_lib.restore_state(ckpt, step, out_setup, None)
    finally:
      ckpt.close()
    assert jax.tree.map(np.shape, state) == jax.tree.map(np.shape, out_setup.abstract_state)


def test_curves_png_and_the_plot_command(copied_run):
  from bmojo_jax.train import plots  # pylint: disable=g-import-not-at-top
  path = plots.maybe_plot(copied_run)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  out = subprocess.run([sys.executable, "-m", "bmojo_jax.train.plots", "/no/such/run"], cwd=REPO, capture_output=True,
                       text=True)
  assert out.returncode != 0 and "usage: python -m bmojo_jax.train.plots WORKDIR" in out.stderr


def _cli(*args, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "bmojo_jax.train.cli", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def test_cli_train_eval(tmp_path, train_compilation_cache):
  workdir = str(tmp_path / "cli")
  overrides = ["--config.model.d_model=16", "--config.model.n_layers=2", "--config.model.d_state=4",
               "--config.data.seq_len=32", "--config.data.num_kv_pairs=4", "--config.data.num_train=64",
               "--config.data.num_test=8", "--config.train.num_steps=3", "--config.train.batch_size=4",
               "--config.train.eval_batch_size=8", "--config.train.progress_bar=false",
               "--config.train.plot=false"]
  env = cache_env(train_compilation_cache)   # eval reads the programs train compiled
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


def test_cli_sigterm_exits_75_and_labels_figures_with_their_step(tmp_path, train_compilation_cache):
  """A real SIGTERM to bmojo-train: the step in flight finishes, a checkpoint is saved, the process exits with
  75 (EX_TEMPFAIL) so schedulers can requeue, and results.json gives the step of its test figures."""
  import time  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "cli"
  overrides = ["--config.model.d_model=16", "--config.model.n_layers=2", "--config.model.d_state=4",
               "--config.data.seq_len=32", "--config.data.num_kv_pairs=4", "--config.data.num_train=64",
               "--config.data.num_test=8", "--config.train.num_steps=100000", "--config.train.batch_size=4",
               "--config.train.eval_batch_size=8", "--config.train.eval_every=5", "--config.train.log_every=5",
               "--config.train.progress_bar=false", "--config.train.plot=false"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **cache_env(train_compilation_cache))
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
