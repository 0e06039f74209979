"""Text input: strict UTF-8 unless an encoding is named, and empty files / empty corpora named in one line
(train/data/text.py, read by training, `bmojo-eval` and `bmojo-prepare` alike)."""

import os
import subprocess
import sys

import pytest

from bmojo_jax.train.data import sources
from bmojo_jax.train.data import text
from bmojo_jax.train.data import tokenizers

LATIN1 = "Déjà vu, café crème.\n".encode("latin-1")      # é and à as single bytes: not UTF-8


def test_non_utf8_file_is_refused_naming_file_and_byte(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes(LATIN1)
  with pytest.raises(text.TextDecodeError, match=r"latin1\.txt: not valid utf-8 at byte 1 .*data\.encoding"):
    text.read_text_files([str(path)])
  with pytest.raises(text.TextDecodeError, match=r"latin1\.txt: not valid utf-8 at byte 1"):
    sources.TextFileDocuments([str(tmp_path)])[0]                 # bmojo-prepare's reader: the same rule
  # Named encoding: the text as written, re-encoded as UTF-8 by the byte tokenizer (é is two bytes).
  (doc,) = text.read_text_files([str(path)], encoding="latin-1")
  assert doc == "Déjà vu, café crème.\n"
  assert len(tokenizers.ByteTokenizer().encode(doc)) == len(LATIN1) + 4
  (replaced,) = text.read_text_files([str(path)], errors="replace")
  assert replaced.count("\ufffd") == 4                             # only when asked for
  with pytest.raises(ValueError, match="unknown encoding"):
    text.read_text_files([str(path)], encoding="no-such-codec")


def test_empty_files_and_empty_corpora_are_named(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  with pytest.raises(text.EmptyTextError, match=r"Text file is empty: .*empty\.txt"):
    text.make_text_source([str(empty)], seq_len=8)
  with pytest.raises(text.EmptyTextError, match=r"No text under directory .*: its 1 file\(s\) .* are all empty"):
    sources.TextFileDocuments([str(tmp_path)])
  (tmp_path / "book.txt").write_text("Some text.\n", encoding="utf-8")
  assert text.list_text_files([str(tmp_path)]) == [str(tmp_path / "book.txt")]   # empty ones in a folder skipped
  assert text.read_text_files([str(tmp_path)]) == ["Some text.\n"]


def test_training_refuses_latin1_text_in_one_line(tmp_path):
  """bmojo-train on a Latin-1 file stops before the workdir is used, in one line naming the file and offset;
  --config.data.encoding=latin-1 gets past the data (checked on the config only: no training run here)."""
  path = tmp_path / "latin1.txt"
  path.write_bytes(LATIN1 * 50)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.getcwd()}
  cmd = [sys.executable, "-c", "from bmojo_jax.train.cli import train_main; train_main()", "--config",
         "configs/lm.py:bmojo,smoke", f"--config.data.paths={path}", f"--workdir={tmp_path / 'run'}"]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode != 0
  lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
  assert "latin1.txt: not valid utf-8 at byte 1" in lines[-1] and "Traceback" not in out.stderr, out.stderr
  from bmojo_jax.configs import lm  # pylint: disable=g-import-not-at-top
  from bmojo_jax.train import tasks  # pylint: disable=g-import-not-at-top
  config = lm.get_config("bmojo,smoke")
  config.data.paths, config.data.seq_len, config.data.encoding = str(path), 16, "latin-1"
  task = tasks.make_task(config)
  assert task.info["tokens"] == 50 * (len(LATIN1) + 4) + 2         # BOS + the UTF-8 bytes + EOS
