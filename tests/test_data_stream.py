"""Prepared token streams (bmojo-prepare, issue #22): the stream equals packing in memory, a prepare resumes
after an interruption, worker processes, corrupt or mismatched streams refused, the grain iterator's resume and
shards over a stream, and the command's input errors. Every file is written here in tmp_path."""

import json
import os

import numpy as np
import pytest

from tests.data_documents import T, KEYS, assert_examples_equal, documents, prepared, write_files
from bmojo_jax.train.data import packing
from bmojo_jax.train.data import pipeline
from bmojo_jax.train.data import prepare
from bmojo_jax.train.data import sources
from bmojo_jax.train.data import stream
from bmojo_jax.train.data import tokenizers


def test_prepared_stream_equals_packing_in_memory(tmp_path):
  docs = documents()
  out, meta = prepared(tmp_path, docs)
  reference = packing.pack_documents(docs, tokenizers.ByteTokenizer(), T)
  src = stream.PackedStreamSource(out, T, tokenizers.ByteTokenizer())
  assert isinstance(src.tokens, np.memmap) and isinstance(src.doc_starts, np.memmap)
  assert src.tokens.dtype == np.uint16 and meta["num_documents"] == len(docs)
  assert len(src) == len(reference) and src.num_tokens == reference.num_tokens
  for j in range(len(src)):
    assert_examples_equal(src[j], reference[j])
  assert sorted(os.listdir(out)) == ["doc_offsets.npy", "meta.json", "tokens.bin"]   # parts and progress removed


def test_prepare_resumes_after_interruption(tmp_path):
  docs = documents()
  write_files(tmp_path, docs)
  out, meta = prepared(tmp_path, docs, name="resumed", stop_after_shards=2)
  assert meta is None
  progress = json.load(open(os.path.join(out, prepare.PROGRESS)))
  assert progress["done"] == [0, 1] and not os.path.exists(os.path.join(out, "meta.json"))
  with pytest.raises(FileNotFoundError, match="no finished token stream"):
    stream.PackedStreamSource(out, T)
  os.remove(prepare._part_paths(out, 1)[0])   # a part lost in the crash is redone
  _, meta = prepared(tmp_path, docs, name="resumed")
  fresh, fresh_meta = prepared(tmp_path, docs, name="fresh")
  for name in ("tokens.bin", "doc_offsets.npy"):
    assert open(os.path.join(out, name), "rb").read() == open(os.path.join(fresh, name), "rb").read()
  assert meta["num_tokens"] == fresh_meta["num_tokens"]
  written = os.stat(os.path.join(out, "tokens.bin")).st_mtime_ns
  assert prepared(tmp_path, docs, name="resumed")[1] == meta            # finished: returned as it is,
  assert os.stat(os.path.join(out, "tokens.bin")).st_mtime_ns == written  # not prepared again
  assert meta["plan"] == progress["plan"]                                 # one meta.json, with its plan
  with pytest.raises(ValueError, match="another plan"):
    prepare.prepare(sources.TextFileDocuments(str(tmp_path / "texts")), out, tokenizers.ByteTokenizer(), workers=1,
                    docs_per_shard=5, progress_bar=False)


@pytest.mark.slow
def test_prepare_cli_with_worker_processes(tmp_path, capsys):
  docs = documents(9)
  folder = write_files(tmp_path, docs)
  out = str(tmp_path / "cli")
  prepare.main(["--out", out, "--text", folder, "--workers", "2", "--docs-per-shard", "2", "--no-progress"])
  assert "tokens (uint16) in 9 documents" in capsys.readouterr().out
  reference = packing.pack_documents(docs, tokenizers.ByteTokenizer(), T)
  src = stream.PackedStreamSource(out, T)
  for j in range(len(src)):
    assert_examples_equal(src[j], reference[j])


def test_stream_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist.*bmojo-prepare"):
    stream.PackedStreamSource(str(tmp_path / "missing"), T)
  docs = documents(6)
  out, _ = prepared(tmp_path, docs)
  meta_path = os.path.join(out, "meta.json")
  good = open(meta_path).read()
  open(meta_path, "w").write(good[:20])
  with pytest.raises(ValueError, match="Corrupt token stream metadata"):
    stream.PackedStreamSource(out, T)
  meta = json.loads(good)
  meta["num_tokens"] += 1
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(ValueError, match="bytes but meta.json says"):
    stream.PackedStreamSource(out, T)
  meta = json.loads(good)
  meta["tokenizer"]["vocab_size"] = 200                    # ids up to 258 are now out of range
  json.dump(meta, open(meta_path, "w"))
  src = stream.PackedStreamSource(out, T)
  with pytest.raises(ValueError, match="holds id 257 >= vocab_size 200"):
    src[0]
  meta = json.loads(good)
  meta["tokenizer"]["pad_id"] = 3
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(ValueError, match="another tokenizer.*pad_id 3 there vs 256 here"):
    stream.PackedStreamSource(out, T, tokenizers.ByteTokenizer())
  json.dump(json.loads(good), open(meta_path, "w"))
  np.save(os.path.join(out, "doc_offsets.npy"), np.zeros((0,), np.int64))     # a stream of no documents
  for reader in (lambda: stream.PackedStreamSource(out, T), lambda: stream.StreamDocuments(out)):
    with pytest.raises(ValueError, match="doc_offsets.npy holds no documents"):
      reader()
  with pytest.raises(ValueError, match="outside the vocabulary"):
    stream.StreamWriter(str(tmp_path / "bad"), tokenizers.ByteTokenizer().vocab_size).add(np.array([1, 300, 2]),
                                                                                          np.int64([3]))


def test_stream_resume_and_shards(tmp_path):
  docs = documents(40)
  out, _ = prepared(tmp_path, docs)
  src = stream.PackedStreamSource(out, T)
  it = pipeline.make_train_iterator(src, batch_size=2, seed=3, num_threads=0)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  fresh = pipeline.make_train_iterator(src, batch_size=2, seed=3, num_threads=0)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for k in KEYS:
      np.testing.assert_array_equal(got[k], want[k])
  seen = []
  for shard in (0, 1):
    it = pipeline.make_train_iterator(src, batch_size=1, seed=0, num_epochs=1, shard_index=shard, shard_count=2,
                                      num_threads=0)
    seen.append({b["inputs"].tobytes() + b["positions"].tobytes() for b in it})
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == len(src) // 2 * 2


def test_prepare_help_and_input_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    prepare.main(["--help"])
  assert e.value.code == 0 and "--array-record" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="exactly one input"):
    prepare.main(["--out", str(tmp_path / "s")])
  with pytest.raises(SystemExit, match="Text path does not exist"):
    prepare.main(["--out", str(tmp_path / "s"), "--text", str(tmp_path / "missing")])
