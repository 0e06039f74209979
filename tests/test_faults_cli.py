"""Refusals in one or two lines (issue #31 item 8, #34 item 7): bmojo-prepare's resume checks, links planted in
its folder, Ctrl-C and full disk, and impossible or misleading settings. No training: each case is refused before
the first step. (The table of bad command lines: tests/test_cli_inputs.py.)"""

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from bmojo_jax.train import files
from bmojo_jax.train.data import prepare
from bmojo_jax.train.data import sources
from bmojo_jax.train.data import stream
from bmojo_jax.train.data import tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _texts(folder, docs):
  folder.mkdir()
  for i, d in enumerate(docs):
    (folder / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
  return str(folder)


def _prepare(folder, out, **kw):
  return prepare.prepare(sources.TextFileDocuments(folder), out, tokenizers.ByteTokenizer(), workers=1, docs_per_shard=2,
                         progress_bar=False, **kw)


def test_a_resume_with_other_inputs_is_refused_naming_them(tmp_path, capsys):
  """Two corpora of the same document count: the plan used to be "6 text files" for both, and the resume mixed
  them. A file edited since the interruption is refused too."""
  first = _texts(tmp_path / "a", [f"first corpus {i}" for i in range(6)])
  second = _texts(tmp_path / "b", [f"second corpus {i}" for i in range(6)])
  out = str(tmp_path / "out")
  assert _prepare(first, out, stop_after_shards=1) is None
  with pytest.raises(ValueError, match=r"another plan \(differs in \['.*/b/doc000.txt is new'.*'9 more'\]\)"):
    _prepare(second, out)
  (tmp_path / "a" / "doc005.txt").write_text("edited", encoding="utf-8")
  with pytest.raises(ValueError, match=r"differs in \['.*/a/doc005.txt changed'\]"):
    _prepare(first, out)
  (tmp_path / "a" / "doc005.txt").write_text("first corpus 5", encoding="utf-8")
  capsys.readouterr()
  meta = _prepare(first, out)
  assert f"{out}: resuming at document 2 of 6 (1 of 3 shards were done by an earlier run)." in \
      capsys.readouterr().err
  assert [f["path"] for f in meta["plan"]["inputs"]] == [os.path.join(first, f"doc{i:03d}.txt") for i in range(6)]


@pytest.mark.parametrize("name", [stream.TOKENS, "doc_lengths.tmp", "parts/part-000001.bin.tmp", "parts"])
def test_a_link_planted_in_a_stream_folder_is_refused_and_its_target_untouched(tmp_path, name):
  """A resumed prepare writes the parts left and then the stream's files: none through a link out of `out`."""
  folder = _texts(tmp_path / "a", [f"document {i}" for i in range(4)])
  out, outside = tmp_path / "out", tmp_path / "precious"
  assert _prepare(folder, str(out), stop_after_shards=1) is None
  outside.mkdir() if name == "parts" else outside.write_text("keep me")
  if name == "parts":
    os.rename(out / "parts", tmp_path / "parts")
  os.symlink(outside, out / name)
  with pytest.raises(files.UnsafePathError, match="symbolic link"):
    _prepare(folder, str(out))
  assert (os.listdir(outside) == [] if outside.is_dir() else outside.read_text() == "keep me")


def test_doc_offsets_out_of_order_or_past_the_tokens_are_refused(tmp_path):
  out = str(tmp_path / "out")
  _prepare(_texts(tmp_path / "a", [f"document {i}" for i in range(5)]), out)
  path = os.path.join(out, stream.OFFSETS)
  good = np.load(path)
  for bad, why in ((good[[0, 2, 1, 3, 4]], "document 2 starts at .* not after document 1"),
                   (np.append(good[:-1], 10**6), "its last document starts at 1000000, past the")):
    np.save(path, bad)
    with pytest.raises(ValueError, match=f"{path} is corrupt: {why}"):
      stream.PackedStreamSource(out, 8)
  np.save(path, good)
  assert len(stream.PackedStreamSource(out, 8)) > 0


def test_prepare_ctrl_c_and_a_full_disk_are_one_or_two_lines(tmp_path, monkeypatch, capsys):
  folder = _texts(tmp_path / "a", ["x"] * 4)
  argv = ["--out", str(tmp_path / "out"), "--text", folder, "--workers", "1", "--no-progress"]

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(prepare, "prepare", interrupted)
  with pytest.raises(SystemExit) as e:
    prepare.main(argv)
  assert e.value.code == 130
  assert capsys.readouterr().err.strip().splitlines() == [
      f"bmojo-prepare: interrupted; the finished shards are kept in {tmp_path / 'out'}: rerun the same command to "
      "resume."]

  def full(*args, **kwargs):
    raise files.WriteError(str(tmp_path / "out" / "progress.json"), OSError(errno.ENOSPC, "No space left on device"))
  monkeypatch.setattr(prepare, "prepare", full)
  with pytest.raises(SystemExit) as e:
    prepare.main(argv)
  assert str(e.value.code).splitlines() == [
      f"bmojo-prepare: writing {tmp_path / 'out' / 'progress.json'} failed: no space left on device.",
      "Free some space and rerun the same command: it resumes from the shards already done."]


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


def test_plots_help_exits_zero():
  out = _cli("bmojo_jax.train.plots", "--help")
  assert out.returncode == 0 and out.stdout.startswith("usage: python -m bmojo_jax.train.plots WORKDIR"), out.stderr


@pytest.mark.parametrize("section, field, value, match", [
    ("optim", "eps", -1e-8, r"optim.eps=-1e-08 must be >= 0"),
    ("data", "kind", "text", r"data.kind='text' needs a text config .* use --config configs/lm.py"),
    ("data", "num_test", 10**10, r"data.num_test=10000000000 is too many examples"),
])
def test_impossible_settings_are_refused_before_the_workdir_exists(tmp_path, section, field, value, match):
  from tests.conftest import tiny_train_config  # pylint: disable=g-import-not-at-top
  from bmojo_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = tiny_train_config()
  config[section][field] = value
  with pytest.raises(ValueError, match=match):
    trainer.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_settings_that_run_but_mislead_are_warned():
  from tests.conftest import tiny_train_config  # pylint: disable=g-import-not-at-top
  from bmojo_jax.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  from bmojo_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = tiny_train_config(num_steps=3)
  config.optim.warmup_steps = 5
  config.model.update(family="hybrid", window=32)
  warnings = trainer.config_warnings(setup_lib.build(config))
  assert warnings == [
      "Warning: optim.warmup_steps=5 > train.num_steps=3: the learning rate never reaches optim.learning_rate="
      f"{config.optim.learning_rate}.",
      "Warning: model.window=32 >= data.seq_len=32: every key stays inside the attention window, so MQAR no longer "
      "tests recall beyond it."]
