"""Text data: tokenizers, file sources and packing, on real text found offline (stdlib sources)."""

import collections
import inspect
import json
import os
import textwrap

import numpy as np
import pytest

from bmojo_jax.train.data import packing
from bmojo_jax.train.data import sources
from bmojo_jax.train.data import text
from bmojo_jax.train.data import tokenizers


def _stdlib_files():
  """Three real text files that exist on every machine: Python standard-library sources."""
  return [inspect.getsourcefile(m) for m in (collections, json, textwrap)]


def test_byte_tokenizer_round_trip():
  tok = tokenizers.ByteTokenizer()
  source = open(inspect.getsourcefile(textwrap), encoding="utf-8").read()
  sample = source[:2000] + " — naïve café ✓"
  ids = tok.encode(sample)
  assert max(ids) < 256 and min(ids) >= 0
  assert tok.decode(ids) == sample
  np.testing.assert_array_equal(tok.encode_array(sample), ids)
  assert tok.vocab_size == 259
  assert {tok.pad_id, tok.bos_id, tok.eos_id} == {256, 257, 258}
  assert tok.decode([tok.bos_id, *ids[:5], tok.eos_id, tok.pad_id]) == sample[:5]


def test_list_text_files_recurses_and_sorts():
  json_dir = os.path.dirname(inspect.getsourcefile(json))
  files = text.list_text_files(json_dir, patterns=("*.py",))
  assert os.path.join(json_dir, "__init__.py") in files
  assert files == sorted(files)
  email_dir = os.path.dirname(inspect.getsourcefile(__import__("email")))
  nested = text.list_text_files(email_dir, patterns=("*.py",))
  assert any(os.sep + "mime" + os.sep in f for f in nested)  # email/mime/*.py, one level down


def test_missing_path_raises_first(tmp_path):
  missing = str(tmp_path / "no_such_corpus")
  with pytest.raises(FileNotFoundError, match="no_such_corpus"):
    text.list_text_files([_stdlib_files()[0], missing])
  with pytest.raises(FileNotFoundError, match="no_such_corpus"):
    text.make_text_source([missing], seq_len=16)
  with pytest.raises(FileNotFoundError, match="No files matching"):
    text.list_text_files(str(tmp_path), patterns=("*.txt",))


def _packed(seq_len=64):
  docs = text.read_text_files(_stdlib_files())
  return docs, packing.pack_documents(docs, tokenizers.ByteTokenizer(), seq_len)


def test_packing_shapes_and_shift():
  docs, source = _packed(64)
  tok = tokenizers.ByteTokenizer()
  total = sum(len(d.encode("utf-8")) + 2 for d in docs)
  assert source.num_tokens == total
  assert len(source) == (total - 2) // 64 + 1
  for i in (0, 1, len(source) // 2, len(source) - 1):
    ex = source[i]
    for k in ("inputs", "targets", "segment_ids", "positions"):
      assert ex[k].shape == (64,) and ex[k].dtype == np.int32
    # Targets are the inputs shifted by one, except across a document boundary or into padding.
    keep = ex["targets"] != packing.IGNORE_INDEX
    both = keep[:-1] & (ex["segment_ids"][1:] > 0)
    np.testing.assert_array_equal(ex["targets"][:-1][both], ex["inputs"][1:][both])
    masked = np.flatnonzero(~keep & (ex["segment_ids"] > 0))
    assert np.all(ex["inputs"][masked] == tok.eos_id)  # only EOS → next document is dropped
  # Consecutive sequences overlap by one token: the last target is the next sequence's first input.
  a, b = source[0], source[1]
  assert a["targets"][-1] == b["inputs"][0]


def test_packing_keeps_document_boundaries():
  docs, source = _packed(128)
  tok = tokenizers.ByteTokenizer()
  stream = np.concatenate([source[i]["inputs"] for i in range(len(source))])
  segs = [source[i]["segment_ids"] for i in range(len(source))]
  for ex, seg in zip((source[i] for i in range(len(source))), segs):
    real = seg > 0
    assert seg[0] == 1 and np.all(np.diff(seg[real]) >= 0)
    # Segment ids change exactly after EOS tokens.
    change = np.flatnonzero(np.diff(seg[real]) != 0)
    eos = np.flatnonzero(ex["inputs"][real][:-1] == tok.eos_id)
    np.testing.assert_array_equal(change, eos)
    # Each new document starts with BOS at position 0.
    starts = np.flatnonzero(ex["positions"][real] == 0)
    assert np.all(ex["inputs"][real][starts] == tok.bos_id)
  # Decoding the packed stream gives back the documents, in order.
  real_stream = stream[np.concatenate(segs) > 0]
  pieces = tok.decode(real_stream.tolist())
  assert pieces == "".join(docs)
  # Positions count up within each document and carry over between sequences.
  last = source[len(source) - 1]
  n_real = int((last["segment_ids"] > 0).sum())
  # The stream's final EOS is only a target: the last input is the last byte of the last document.
  assert last["positions"][n_real - 1] == len(docs[-1].encode("utf-8"))
  assert last["targets"][n_real - 1] == tok.eos_id
  assert np.all(last["inputs"][n_real:] == tok.pad_id)
  assert np.all(last["targets"][n_real:] == packing.IGNORE_INDEX)


def test_tfds_missing_is_clear(tmp_path):
  with pytest.raises((ImportError, FileNotFoundError), match="tensorflow_datasets|not prepared"):
    sources.TfdsDocuments("pg19", "train", data_dir=str(tmp_path))


def test_sentencepiece_trained_on_stdlib(tmp_path):
  pytest.importorskip("sentencepiece")
  tok = tokenizers.train_sentencepiece(_stdlib_files(), vocab_size=512,
                                 model_prefix=str(tmp_path / "spm"))
  assert tok.vocab_size == 512
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  sample = "def dumps(obj, *, skipkeys=False):\n    return obj  # naïve ✓\n"
  ids = tok.encode(sample)
  assert tok.decode(ids) == sample
  assert len(ids) < len(sample)
  source = text.make_text_source(_stdlib_files(), seq_len=64, tokenizer=tok)
  assert source[0]["inputs"].max() < 512
