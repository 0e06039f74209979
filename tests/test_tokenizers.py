"""The one description of a tokenizer (train/data/tokenizers.py): what tokenizer.json and a stream's meta.json
record, rebuilt and checked; descriptions written before it grew still load."""

import collections
import inspect
import json
import textwrap

import pytest

from bmojo_jax.train import runs
from bmojo_jax.train.data import tokenizers

# What a version-1 token stream's meta.json holds for the byte tokenizer (and every stream written so far):
# a change here would refuse every prepared stream (and make `bmojo-prepare` refuse to resume one).
STREAM_V1_BYTES = {"kind": "byte", "vocab_size": 259, "bos_id": 257, "eos_id": 258, "pad_id": 256, "sha256": None}


def _sentencepiece(tmp_path):
  pytest.importorskip("sentencepiece")
  files = [inspect.getsourcefile(m) for m in (collections, json, textwrap)]
  return tokenizers.train_sentencepiece(files, vocab_size=400, model_prefix=str(tmp_path / "spm"))


def test_byte_description_is_the_stream_format():
  assert tokenizers.describe(tokenizers.ByteTokenizer()) == STREAM_V1_BYTES
  assert tokenizers.describe(None) == {"kind": "none"}
  assert tokenizers.from_spec("byte") == tokenizers.ByteTokenizer()


def test_workdir_round_trip_and_older_tokenizer_json(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  assert tokenizers.from_description(tokenizers.save(tokenizers.ByteTokenizer(), str(workdir)),
                                     str(workdir)) == tokenizers.ByteTokenizer()
  assert tokenizers.from_description(tokenizers.save(None, str(workdir)), str(workdir)) is None
  # tokenizer.json as written before the description grew: kind and vocab_size only; an empty workdir: none
  assert tokenizers.from_description({"kind": "byte", "vocab_size": 259}, str(workdir)) == tokenizers.ByteTokenizer()
  assert tokenizers.from_description(runs.read_tokenizer_info(str(workdir)), str(workdir)) is None
  with pytest.raises(ValueError, match="vocab_size 300 there vs 259 here"):
    tokenizers.from_description({"kind": "byte", "vocab_size": 300}, str(workdir))
  with pytest.raises(ValueError, match="kind 'wordpiece'"):
    tokenizers.from_description({"kind": "wordpiece"}, str(workdir))


def test_sentencepiece_saved_into_the_workdir(tmp_path):
  tok = _sentencepiece(tmp_path)
  workdir = tmp_path / "run"
  workdir.mkdir()
  description = tokenizers.save(tok, str(workdir))
  assert description["model_file"] == tokenizers.MODEL_FILE and (workdir / tokenizers.MODEL_FILE).exists()
  assert description["sha256"] == tokenizers.describe(tok)["sha256"]
  assert tokenizers.describe(tok)["model_file"] == str(tmp_path / "spm.model")   # a stream records where it lies
  loaded = tokenizers.from_description(description, str(workdir))
  sample = "def f(x):\n    return x  # naïve ✓\n"
  assert loaded.encode(sample) == tok.encode(sample) and loaded.vocab_size == tok.vocab_size
  old = {"kind": "sentencepiece", "model_file": "tokenizer.model", "vocab_size": tok.vocab_size}   # older json
  assert tokenizers.from_description(old, str(workdir)).encode(sample) == tok.encode(sample)
  other = tokenizers.train_sentencepiece([inspect.getsourcefile(collections)], vocab_size=450,
                                         model_prefix=str(tmp_path / "other"))
  (workdir / tokenizers.MODEL_FILE).write_bytes(open(other.model_file, "rb").read())   # another model there
  with pytest.raises(ValueError, match="describes another tokenizer than the model file.*vocab_size 400 there vs "
                                       "450 here, sha256"):
    tokenizers.from_description(description, str(workdir))


def test_check_names_every_difference():
  recorded = dict(STREAM_V1_BYTES, pad_id=3, eos_id=9)
  with pytest.raises(ValueError, match=r"^here: eos_id 9 there vs 258 here, pad_id 3 there vs 256 here\. fix$"):
    tokenizers.check(recorded, tokenizers.ByteTokenizer(), "here", "fix")
  tokenizers.check(STREAM_V1_BYTES, tokenizers.ByteTokenizer(), "here", "fix")


def test_sentencepiece_pickles_as_its_model(tmp_path):
  """grain's worker processes and bmojo-prepare's pool receive the tokenizer pickled."""
  import pickle  # pylint: disable=g-import-not-at-top
  tok = _sentencepiece(tmp_path)
  data = pickle.dumps(tok)
  assert len(data) < 1000                        # the path, not the model
  again = pickle.loads(data)
  assert again.model_file == tok.model_file and again.encode("naïve ✓ text") == tok.encode("naïve ✓ text")
