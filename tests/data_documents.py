"""Documents for the data-side tests (tests/test_data_sources.py, tests/test_data_stream.py): text files,
prepared streams and ArrayRecord files written in a tmp_path, and the check that two packed examples agree."""

import numpy as np

from bmojo_jax.train.data import prepare
from bmojo_jax.train.data import sources
from bmojo_jax.train.data import tokenizers

T = 16
KEYS = ("inputs", "targets", "segment_ids", "positions")


def documents(n=23, seed=0):
  """Documents of varied lengths (some longer than 2T), each unique (its index first)."""
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "naïve", "café", "\n", "✓"]
  return [f"{i}:" + " ".join(rng.choice(words, size=int(rng.integers(0, 12)))) for i in range(n)]


def write_files(tmp_path, docs):
  folder = tmp_path / "texts"
  folder.mkdir()
  for i, d in enumerate(docs):
    (folder / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
  return str(folder)


def prepared(tmp_path, docs, name="stream", **kw):
  files = sources.TextFileDocuments(write_files(tmp_path, docs) if not (tmp_path / "texts").exists()
                                    else str(tmp_path / "texts"))
  out = str(tmp_path / name)
  meta = prepare.prepare(files, out, tokenizers.ByteTokenizer(), workers=1, docs_per_shard=4, progress_bar=False, **kw)
  return out, meta


def assert_examples_equal(a, b):
  assert set(a) == set(KEYS) == set(b)
  for k in KEYS:
    assert a[k].dtype == np.int32 and a[k].shape == (T,), (k, a[k].dtype, a[k].shape)
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def write_array_record(path, records):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()
