"""Data at pod scale (issue #22): ArrayRecord and tfds documents, on-the-fly packing, tasks built from each
source (the prepared streams themselves: tests/test_data_stream.py).

No network: every file is written here in tmp_path; tfds is faked (and, when tensorflow_datasets is
installed, also its own `tfds.testing.mock_data`).
"""

import json
import sys
import types

import jax
import numpy as np
import pytest

from tests.data_documents import T, KEYS, assert_examples_equal, documents, prepared, write_array_record
from bmojo_jax.train import tasks
from bmojo_jax.train.data import packing
from bmojo_jax.train.data import pipeline
from bmojo_jax.train.data import prepare
from bmojo_jax.train.data import sources
from bmojo_jax.train.data import stream
from bmojo_jax.train.data import tokenizers

# ---------------------------------------------------------------------------------------------- on the fly
def _packed_in_order(documents):
  """Every example of one ordered pass of the training pipeline over `documents` packed on the fly."""
  src = packing.OnTheFlySource(documents, tokenizers.ByteTokenizer(), T)
  it = pipeline.make_train_iterator(src, batch_size=1, seed=0, shuffle=False, num_epochs=1)
  return [{k: v[0] for k, v in batch.items()} for batch in it]


def test_onthefly_packing_equals_packing_in_memory():
  docs = documents(31)
  reference = packing.pack_documents(docs, tokenizers.ByteTokenizer(), T)
  packed = _packed_in_order(docs)
  # Identical except at the very end: the on-the-fly pass also packs the final EOS as an input (target -100).
  assert len(packed) in (len(reference), len(reference) + 1)
  for j in range(len(reference) - 1):
    assert_examples_equal(packed[j], reference[j])
  last, ref_last = packed[len(reference) - 1], reference[len(reference) - 1]
  n = int((ref_last["segment_ids"] > 0).sum())
  for k in KEYS:
    np.testing.assert_array_equal(last[k][:n], ref_last[k][:n])


def _shard_documents(it, tokenizer):
  """The documents a finished iterator read, decoded from the packed inputs (split at BOS)."""
  ids = []
  for batch in it:
    for row, seg in zip(batch["inputs"], batch["segment_ids"]):
      ids.extend(row[seg > 0].tolist())
  docs, current = [], None
  for i in ids:
    if i == tokenizer.bos_id:
      current = []
    elif i == tokenizer.eos_id:
      docs.append(tokenizer.decode(current))
    else:
      current.append(i)
  return docs


def test_onthefly_shards_are_disjoint_and_cover(tmp_path):
  docs = documents(30)
  tok = tokenizers.ByteTokenizer()
  src = packing.OnTheFlySource(docs, tok, T)
  seen = []
  for shard in (0, 1):
    it = pipeline.make_train_iterator(src, batch_size=1, seed=5, num_epochs=1, shard_index=shard, shard_count=2)
    seen.append(_shard_documents(it, tok))
  assert len(seen[0]) == len(set(seen[0])) == 15 and not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(docs)


def test_array_record_documents(tmp_path):
  docs = documents(12)
  write_array_record(tmp_path / "docs.array_record", [d.encode("utf-8") for d in docs])
  write_array_record(tmp_path / "json.array_record", [json.dumps({"body": d}).encode() for d in docs])
  src = sources.ArrayRecordDocuments([str(tmp_path / "docs.array_record")])
  assert len(src) == 12 and [src[i] for i in range(12)] == docs
  js = sources.ArrayRecordDocuments(str(tmp_path / "json.array_record"), text_key="body")
  assert js[3] == docs[3]
  with pytest.raises(ValueError, match="no field 'text'"):
    sources.ArrayRecordDocuments(str(tmp_path / "json.array_record"), text_key="text")[0]
  with pytest.raises(FileNotFoundError, match="ArrayRecord file does not exist"):
    sources.ArrayRecordDocuments([str(tmp_path / "nope.array_record")])
  # prepared from ArrayRecord == packed in memory
  out = str(tmp_path / "stream")
  prepare.main(["--out", out, "--array-record", str(tmp_path / "docs.array_record"), "--workers", "1",
                "--no-progress"])
  reference = packing.pack_documents(docs, tokenizers.ByteTokenizer(), T)
  s = stream.PackedStreamSource(out, T)
  for j in range(len(s)):
    assert_examples_equal(s[j], reference[j])


def _resume_is_exact(make, k=3, n=4):
  it = make()
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))       # what grain's Orbax handler stores
  expected = [next(it) for _ in range(n)]
  fresh = make()
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for key in KEYS:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_onthefly_resume_is_exact(tmp_path):
  docs = documents(25)
  write_array_record(tmp_path / "docs.array_record", [d.encode("utf-8") for d in docs])
  src = packing.OnTheFlySource(sources.ArrayRecordDocuments(str(tmp_path / "docs.array_record")),
                                tokenizers.ByteTokenizer(), T)
  for k in (1, 3, 7, 11):   # states taken inside and between documents (with a remainder in the packer)
    _resume_is_exact(lambda: pipeline.make_train_iterator(src, batch_size=2, seed=1), k=k)
  # Documents of exactly T tokens: every state has no remainder, which a JSON round trip used to lose.
  exact = packing.OnTheFlySource([f"{i:014d}" for i in range(9)], tokenizers.ByteTokenizer(), T)
  _resume_is_exact(lambda: pipeline.make_train_iterator(exact, batch_size=1, seed=1), k=2)


def test_onthefly_resume_through_orbax(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  src = packing.OnTheFlySource(documents(25), tokenizers.ByteTokenizer(), T)
  make = lambda: pipeline.make_train_iterator(src, batch_size=2, seed=4)
  it = make()
  for _ in range(5):
    next(it)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(5, args=ocp.args.Composite(data=pipeline.iterator_save_args(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    fresh = make()
    mngr.restore(5, args=ocp.args.Composite(data=pipeline.iterator_restore_args(fresh)))
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    np.testing.assert_array_equal(got["positions"], want["positions"])


# ---------------------------------------------------------------------------------------------------- tfds
class _FakeTfds(types.ModuleType):
  """What TfdsDocuments uses of tensorflow_datasets: data_source(name, split=, data_dir=, download=)."""

  def __init__(self, splits):
    super().__init__("tensorflow_datasets")
    self.splits, self.calls = splits, []

  def data_source(self, name, *, split, data_dir=None, download=True):
    self.calls.append((name, split, data_dir, download))
    if name not in self.splits or split not in self.splits[name]:
      raise ValueError(f"Dataset {name} split {split} not found")
    return [{"text": d.encode("utf-8"), "id": i} for i, d in enumerate(self.splits[name][split])]


def _lm_config(**data):
  from bmojo_jax.configs import lm  # pylint: disable=g-import-not-at-top
  c = lm.get_config("bmojo,smoke")
  c.data.seq_len = T
  c.data.max_eval_sequences = 0
  c.data.update(data)
  return c


def test_tfds_documents_through_fake_module(tmp_path, monkeypatch):
  train_docs, eval_docs = documents(20), documents(5, seed=1)
  fake = _FakeTfds({"toy": {"train": train_docs, "validation": eval_docs}})
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  src = sources.TfdsDocuments("toy", "train")
  assert len(src) == 20 and src[4] == train_docs[4] and fake.calls[0] == ("toy", "train", None, False)
  with pytest.raises(FileNotFoundError, match="not prepared.*tfds build"):
    sources.TfdsDocuments("toy", "test")
  with pytest.raises(ValueError, match="no feature 'body'"):
    sources.TfdsDocuments("toy", "train", text_key="body")[0]
  task = tasks.make_task(_lm_config(kind="tfds", tfds_name="toy", tfds_eval_split="validation"))
  assert isinstance(task.train_source, packing.OnTheFlySource) and task.info["eval_documents"] == 5
  reference = packing.pack_documents(eval_docs, tokenizers.ByteTokenizer(), T)
  assert len(task.eval_source) == len(reference)
  assert_examples_equal(task.eval_source[1], reference[1])
  batch = next(pipeline.make_train_iterator(task.train_source, batch_size=4, seed=0))
  assert batch["inputs"].shape == (4, T) and batch["inputs"].dtype == np.int32


def test_tfds_missing_package_is_clear(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r"pip install 'bmojo_jax\[tfds\]'"):
    sources.TfdsDocuments("pg19", "train")


def test_tfds_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
    src = sources.TfdsDocuments("lm1b", "train")
    docs = [src[i] for i in range(len(src))]
    assert len(docs) == 7 and len(set(docs)) > 1 and all(docs)   # the mock's distinct, non-empty texts
    packed = _packed_in_order(src)
  reference = packing.pack_documents(docs, tokenizers.ByteTokenizer(), T)
  for j in range(len(reference) - 1):
    assert_examples_equal(packed[j], reference[j])


# --------------------------------------------------------------------------------------------- make_task
def test_make_task_stream_and_array_record(tmp_path):
  docs = documents(40)
  out, _ = prepared(tmp_path, docs)
  task = tasks.make_task(_lm_config(kind="stream", stream_dir=out))
  assert isinstance(task.train_source.__dict__.get("_source"), stream.PackedStreamSource)
  assert task.vocab_size == 259 and task.info["documents"] == 40
  assert len(task.train_source) + len(task.eval_source) == len(stream.PackedStreamSource(out, T))
  with pytest.raises(FileNotFoundError, match="bmojo-prepare"):
    tasks.make_task(_lm_config(kind="stream", stream_dir=str(tmp_path / "none")))
  with pytest.raises(ValueError, match="needs data.stream_dir"):
    tasks.make_task(_lm_config(kind="stream"))
  write_array_record(tmp_path / "docs.array_record", [d.encode("utf-8") for d in docs])
  task = tasks.make_task(_lm_config(kind="array_record", array_record_paths=str(tmp_path / "docs.array_record")))
  assert len(task.train_source) == 38 and task.info["eval_documents"] == 2
  reference = packing.pack_documents(docs[38:], tokenizers.ByteTokenizer(), T)
  assert_examples_equal(task.eval_source[0], reference[0])
  with pytest.raises(ValueError, match="needs data.array_record_paths"):
    tasks.make_task(_lm_config(kind="array_record"))
  with pytest.raises(ValueError, match="data.kind='nope' is unknown"):
    tasks.make_task(_lm_config(kind="nope"))


def test_trainer_accepts_fewer_documents_than_a_batch(tmp_path):
  """Packed on the fly, one document fills many sequences: 3 training documents feed a batch of 8."""
  from bmojo_jax.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  from bmojo_jax.train import sharding as shard_lib  # pylint: disable=g-import-not-at-top
  docs = documents(5)
  write_array_record(tmp_path / "docs.array_record", [d.encode("utf-8") for d in docs])
  config = _lm_config(kind="array_record", array_record_paths=str(tmp_path / "docs.array_record"))
  config.train.batch_size = 8
  task = tasks.make_task(config)
  assert len(task.train_source) < config.train.batch_size
  mesh = shard_lib.make_mesh(config.mesh, jax.devices()[:1])
  setup_lib.validate_config(config, mesh, task, setup_lib.model_config(config))


def test_missing_tokenizer_model_is_named(tmp_path):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model.*no such SentencePiece model file"):
    tokenizers.from_spec(missing)
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tasks.make_task(_lm_config(kind="corpus", tokenizer=missing))
