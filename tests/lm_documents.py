"""Texts for the language-model tests (tests/test_lm_corpus.py, test_lm_eval.py, test_lm_niah.py,
test_lm_eval_run.py): a fake Debian package tree (no apt), a few short documents, prepared token streams, and the
smoke LM config that reads a corpus."""

import gzip
import stat
import struct
import zlib

import numpy as np

from bmojo_jax.train.data import debian_texts
from bmojo_jax.train.data import prepare
from bmojo_jax.train.data import sources
from bmojo_jax.train.data import stream
from bmojo_jax.train.data.tokenizers import ByteTokenizer

EMMA = ["EMMA", "", "By Jane Austen", "", "", "", "", "CHAPTER I", "",
        "Emma Woodhouse, handsome, clever, and rich,   ", "with a comfortable home.", "", "", "", "", "FINIS", ""]
NORTHANGER = ["NORTHANGER ABBEY", "", "No one who had ever seen Catherine Morland in her infancy.", "",
              "A NOTE ON THE TEXT", "", "Northanger Abbey was written in 1797-98."]
BIBLE_OUTPUT = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void.

Genesis 2

  1 Thus the heavens and the earth were finished.

1 Samuel 1

  1 Now there was a certain man of Ramathaimzophim.

Song of Solomon 1

  1 The song of songs, which is Solomon's.
"""
DOCS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife.",
        "In the beginning God created the heaven and the earth. And the earth was without form.",
        "short"]


# ------------------------------------------------------------------------ a fake package tree (no apt)
def _i(v: int) -> bytes:
  return struct.pack(">i", v)


def _chars(s: str) -> bytes:
  b = s.encode("utf-8")
  return _i(0x00040009) + _i(len(b)) + b


def _strings(values) -> bytes:
  return _i(16) + _i(len(values)) + b"".join(_chars(v) for v in values)


def _names_attr(names, first: bool) -> bytes:
  """A pairlist {names = names}: the symbol `names` in full the first time, then as a reference (R's way)."""
  symbol = _i(1) + _chars("names") if first else _i(255 | (1 << 8))
  return _i(2 | (1 << 10)) + symbol + _strings(names) + _i(254)


def _serialize(body: bytes) -> bytes:
  return b"X\n" + _i(3) + _i(0x40201) + _i(0x30500) + _i(5) + b"UTF-8" + body


def write_austen(root, novels: dict[str, list[str]]) -> None:
  """Rdata.rdb / Rdata.rdx as R writes a data package's lazy-load database (zlib blocks, gzip index)."""
  folder = root / debian_texts.AUSTEN_DATA
  folder.mkdir(parents=True)
  blocks, offsets = b"", []
  for lines in novels.values():
    raw = _serialize(_strings(lines))
    block = struct.pack(">I", len(raw)) + zlib.compress(raw)
    offsets.append((len(blocks), len(block)))
    blocks += block
  (folder / "Rdata.rdb").write_bytes(blocks)
  variables = (_i(19 | (1 << 9)) + _i(len(novels)) + b"".join(_i(13) + _i(2) + _i(o) + _i(n) for o, n in offsets)
               + _names_attr(list(novels), first=True))
  index = (_i(19 | (1 << 9)) + _i(3) + variables + _i(19) + _i(0) + _i(10) + _i(1) + _i(1)
           + _names_attr(["variables", "references", "compressed"], first=False))
  (folder / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index)))


def write_bible(root) -> None:
  """The `bible` program (a script printing chapters as bible-kjv does) and bible-kjv-text's data file."""
  program = root / debian_texts.KJV_PROGRAM
  program.parent.mkdir(parents=True)
  program.write_text(f"#!/bin/sh\ncat <<'EOF'\n{BIBLE_OUTPUT}EOF\n")
  program.chmod(program.stat().st_mode | stat.S_IEXEC)
  data = root / debian_texts.KJV_DATA
  data.parent.mkdir(parents=True, exist_ok=True)
  data.write_bytes(b"\0")



def write_package_tree(root) -> None:
  """Two Austen novels and the King James Bible's three books under `root`, as their packages install them."""
  write_austen(root, {"emma": EMMA, "northangerabbey": NORTHANGER})
  write_bible(root)


def write_perl_doc(root, pages: dict[str, str], version: str = "5.36.0") -> None:
  """perl-doc's pod folder, with the <major.minor> link Debian adds beside it."""
  folder = root / "usr/share/perl" / version / "pod"
  folder.mkdir(parents=True)
  for page, text in pages.items():
    (folder / f"{page}.pod").write_text(text, encoding="utf-8")
  (root / "usr/share/perl" / version.rsplit(".", 1)[0]).symlink_to(version)


def lm_config(corpus_dir: str):
  """The smoke B'MOJO LM config reading the prepared corpus in corpus_dir, T = 16."""
  from bmojo_jax.configs import lm  # pylint: disable=g-import-not-at-top
  config = lm.get_config("bmojo,smoke")
  config.data.kind, config.data.corpus_dir, config.data.seq_len = "corpus", corpus_dir, 16
  return config


def stream_of(texts: dict[str, str], folder, out) -> str:
  """`texts` written as files into `folder` and prepared by bmojo-prepare (byte tokenizer) into the stream `out`."""
  folder.mkdir(exist_ok=True)
  for name, text in texts.items():
    (folder / name).write_text(text, encoding="utf-8")
  prepare.prepare(sources.TextFileDocuments(str(folder)), str(out), ByteTokenizer(), workers=1, docs_per_shard=2,
                  progress_bar=False)
  return str(out)


def write_sentencepiece_stream(path) -> None:
  """A finished stream of 512 SentencePiece ids at `path`: one the byte tokenizer's runs must refuse."""
  writer = stream.StreamWriter(str(path), 512)
  writer.add(np.array([1, 40, 41, 2]), np.array([4]))
  writer.close({"kind": "sentencepiece", "vocab_size": 512, "bos_id": 1, "eos_id": 2, "pad_id": 0,
                "sha256": "0" * 64, "model_file": "/elsewhere/sp.model"}, "test")
