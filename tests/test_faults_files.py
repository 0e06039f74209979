"""A run's files under faults: nothing read or written through a link or a name out of the workdir, result JSON
strict (null for non-finite, a non-zero exit), a full disk under any writer stops in two lines, files written by
rename, a torn metrics line cut, an unreadable or edited run file named with the fix. Runs of
tests/train_runs.py's tiny config."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from tests.train_runs import NUM_STEPS, REPO, assert_same_run, strict_load, tiny_config
from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import cli
from bmojo_jax.train import faults
from bmojo_jax.train import files
from bmojo_jax.train import metrics as metrics_lib
from bmojo_jax.train import runs
from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train import trainer
from bmojo_jax.train.data import tokenizers


# Every train() here reuses the programs compiled before, here or in another module of tiny_train_config runs.
pytestmark = pytest.mark.usefixtures("train_compilation_cache")


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



# ------------------------------------------------------------------------------------------------- strict JSON
@pytest.mark.slow
def test_eval_writes_strict_json_warns_and_exits_non_zero(reference, tmp_path, train_compilation_cache):
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
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=train_compilation_cache)
  r = subprocess.run([sys.executable, "-m", "bmojo_jax.train.cli", "eval", "--workdir", workdir], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "bmojo-eval: warning: checkpoint 13" in r.stderr and '"test_loss": null' in r.stdout


def test_an_unreadable_results_file_is_named_with_the_fix(tmp_path):
  path = tmp_path / "results.json"
  for text, why in (("", "it is empty"), ('{"step": 1', "it is not valid JSON")):
    path.write_text(text)
    with pytest.raises(files.UnreadableFileError, match=rf"{path} cannot be read: {why}.*Delete it \(or move it "
                                                        r"away\) and rerun the same command"):
      faults.finished(str(path), 3, tiny_config().train)


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



# --------------------------------------------------------------------------------------------------- full disk
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


def test_a_metrics_line_torn_by_a_kill_is_cut_when_the_run_resumes(tmp_path):
  path = tmp_path / metrics_lib.METRICS_FILE
  path.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "tr')
  writer = metrics_lib.MetricWriter(str(tmp_path), total_steps=3, initial_step=1, progress_bar=False)
  writer.write(2, {"loss": 1.5})
  writer.close()
  assert [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(str(tmp_path))] == [(1, 2.0), (2, 1.5)]
