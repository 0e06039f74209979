"""Data at pod scale (issue #22) on this machine: stream reads, on-the-fly SentencePiece, prepare; memory.

    python3 -m benchmarks.speed.data_bench               # ~5-10 min on 2 cores; writes benchmarks/results/data_cpu.json
    python3 -m benchmarks.speed.data_bench --quick         # small sizes, a smoke run (writes nothing)

Every measurement runs in a fresh child process so its peak memory is its own. Memory is read from
/proc/self/status: VmHWM (peak resident set, including file pages mapped from the stream) and RssAnon sampled
every 20 ms (peak anonymous memory: what the process allocated itself; page-cache pages of a memory-mapped file
can be dropped by the kernel at any time). Children of prepare: getrusage(RUSAGE_CHILDREN).ru_maxrss, the
largest worker.

  1. read: a stream of random tokens written straight into the format (10 MB and 1 GB of tokens.bin, uint16),
     read as T=1024 sequences through the training iterator (shuffled, B=32, 2 threads) and by indexing.
  2. tokenize: a SentencePiece model (vocab 4096, trained here on data/corpus or stdlib docstrings), documents
     tokenized and packed on the fly (packing.OnTheFlySource) with 0 (threads), 1 and 2 worker processes,
     and the bare Tokenize transform in one process.
  3. prepare: 1 GB of text files of 1 MB (the corpus text, each file a rotated copy) prepared with the byte
     tokenizer by 2 worker processes, and 100 MB in files of 64 KB with the SentencePiece model (SentencePiece
     slows down on very long inputs: 1.45M tokens/s on 8 KB pieces, 0.38M on 1 MB, one process here).
Temporary files live under a temp dir (or --tmp) and are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks.common import REPO as ROOT

MB = 1 << 20


# --------------------------------------------------------------------------------------------- memory
def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return 0


class PeakAnon:
  """Samples RssAnon every 20 ms in a thread; .peak is the largest seen (bytes)."""

  def __init__(self):
    self.peak = _status("RssAnon")
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.wait(0.02):
      self.peak = max(self.peak, _status("RssAnon"))

  def stop(self) -> dict:
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _status("RssAnon"))
    return {"peak_rss_bytes": _status("VmHWM"), "peak_anon_bytes": self.peak}


# ------------------------------------------------------------------------------------------ children
def child_read(directory: str, seconds: float) -> dict:
  from bmojo_jax.train.data import pipeline, stream  # pylint: disable=g-import-not-at-top
  mem = PeakAnon()
  t, batch = 1024, 32
  src = stream.PackedStreamSource(directory, t)
  assert isinstance(src.tokens, np.memmap)
  rng = np.random.default_rng(0)
  idx = rng.integers(0, len(src), 4000)
  t0 = time.perf_counter()
  for i in idx:
    src[int(i)]
  index_tps = idx.size * t / (time.perf_counter() - t0)
  it = pipeline.make_train_iterator(src, batch_size=batch, seed=0, num_threads=2)
  next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  tps = n * batch * t / (time.perf_counter() - t0)
  return {"tokens_per_s": tps, "index_tokens_per_s": index_tps, "batches": n, "seq_len": t, "batch_size": batch,
          "num_tokens": src.num_tokens, "tokens_bin_bytes": os.path.getsize(os.path.join(directory, "tokens.bin")),
          **mem.stop()}


def _documents(corpus_text: str, count: int, size: int) -> list[str]:
  return [corpus_text[(i * 7919) % (len(corpus_text) - size):][:size] for i in range(count)]


def child_tokenize(model: str, corpus_file: str, workers: int, seconds: float) -> dict:
  from bmojo_jax.train.data import packing, pipeline, tokenizers  # pylint: disable=g-import-not-at-top
  mem = PeakAnon()
  tok = tokenizers.from_spec(model)
  text = open(corpus_file, encoding="utf-8").read()
  docs = _documents(text, 4000, 8192)
  out = {"workers": workers, "vocab_size": tok.vocab_size, "doc_chars": 8192}
  if workers == 0:   # the bare transform, no pipeline
    tz = packing.Tokenize(tok)
    n, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
      n += tz.map(docs[i % len(docs)])["inputs"].size
      i += 1
    out["transform_tokens_per_s"] = n / (time.perf_counter() - t0)
    out["chars_per_token"] = sum(map(len, docs[:i])) / n if i <= len(docs) else None
  src = packing.OnTheFlySource(docs, tok, 1024)
  it = pipeline.make_train_iterator(src, batch_size=8, seed=0, worker_count=workers)
  for _ in range(3):
    next(it)        # workers started, buffers filled
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    n += int((next(it)["segment_ids"] > 0).sum())
  out["tokens_per_s"] = n / (time.perf_counter() - t0)
  out.update(mem.stop())
  return out


def child_prepare(text_dir: str, out_dir: str, tokenizer: str, workers: int, docs_per_shard: int) -> dict:
  from bmojo_jax.train.data import prepare, sources, tokenizers  # pylint: disable=g-import-not-at-top
  mem = PeakAnon()
  docs = sources.TextFileDocuments(text_dir, ("*.txt",))
  text_bytes = sum(os.path.getsize(f) for f in docs.files)
  t0 = time.perf_counter()
  meta = prepare.prepare(docs, out_dir, tokenizers.from_spec(tokenizer), workers=workers,
                         docs_per_shard=docs_per_shard, progress_bar=False)
  wall = time.perf_counter() - t0
  return {"tokenizer": "byte" if tokenizer == "byte" else "sentencepiece", "workers": workers,
          "docs_per_shard": docs_per_shard, "text_bytes": text_bytes, "documents": meta["num_documents"], "num_tokens": meta["num_tokens"],
          "wall_s": wall, "tokens_per_s": meta["num_tokens"] / wall, "text_mb_per_s": text_bytes / MB / wall,
          **mem.stop(), "peak_worker_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def _run_child(name: str, *args) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.speed.data_bench", "--child", name, json.dumps(args)]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if out.returncode != 0:
    raise RuntimeError(f"child {name} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- generators
def write_random_stream(directory: str, num_bytes: int) -> None:
  """uint16 random tokens (ids < 256, byte vocabulary) with documents of random lengths, in 32 MB chunks."""
  from bmojo_jax.train.data import stream, tokenizers  # pylint: disable=g-import-not-at-top
  info = tokenizers.describe(tokenizers.ByteTokenizer())
  writer = stream.StreamWriter(directory, info["vocab_size"])
  rng = np.random.default_rng(0)
  remaining = num_bytes // 2
  while remaining:
    n = min(remaining, 16 * MB)
    lengths = rng.geometric(1 / 2048, size=n // 512 + 16).astype(np.int64)
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends, n))
    lengths = lengths[:k + 1]
    lengths[-1] = n - (int(ends[k - 1]) if k else 0)
    writer.add(rng.integers(0, 256, n, dtype=np.uint16), lengths)
    remaining -= n
  writer.close(info, "random tokens (benchmark)")


def corpus_text() -> str:
  """The prepared corpus' text if there is one (data/corpus), else standard-library docstrings."""
  from bmojo_jax.train.data import corpus, debian_texts  # pylint: disable=g-import-not-at-top
  try:
    docs = corpus.read_split(os.path.join(ROOT, "data", "corpus"), "train")
  except (FileNotFoundError, ValueError):
    docs = debian_texts.stdlib_documents()
  return "\n\n".join(docs.values())


def write_text_files(directory: str, text: str, total_bytes: int, file_bytes: int = MB) -> None:
  os.makedirs(directory)
  data = text.encode("utf-8")
  data = (data * (-(-file_bytes // len(data)) + 1))
  for i in range(-(-total_bytes // file_bytes)):
    off = (i * 104729) % (len(data) - file_bytes)
    chunk = data[off:off + file_bytes].decode("utf-8", errors="ignore")
    with open(os.path.join(directory, f"doc{i:05d}.txt"), "w", encoding="utf-8") as f:
      f.write(chunk)


# --------------------------------------------------------------------------------------------------- main
def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
  parser.add_argument("--tmp", default=None, help="folder for the temporary files (default: a new temp dir)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("args", nargs="?", default="[]", help=argparse.SUPPRESS)
  a = parser.parse_args()
  if a.child:
    print(json.dumps({"read": child_read, "tokenize": child_tokenize, "prepare": child_prepare}[a.child](
        *json.loads(a.args))))
    return

  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from bmojo_jax.train.data import tokenizers  # pylint: disable=g-import-not-at-top
  read_sizes = [10 * MB, 64 * MB] if a.quick else [10 * MB, 1024 * MB]
  # (tokenizer, total text, bytes a file = a document, documents a shard)
  prepare_runs = ([("byte", 32 * MB, MB, 4), ("sp", 8 * MB, 64 * 1024, 32)] if a.quick else
                  [("byte", 1024 * MB, MB, 4), ("sp", 100 * MB, 64 * 1024, 32)])
  seconds = 3.0 if a.quick else 10.0
  tmp = tempfile.mkdtemp(prefix="data_bench_", dir=a.tmp)
  records = []
  try:
    for size in read_sizes:
      d = os.path.join(tmp, f"stream_{size // MB}mb")
      t0 = time.perf_counter()
      write_random_stream(d, size)
      r = _run_child("read", d, seconds)
      records.append({"bench": "stream_read", "size_mb": size // MB, "write_s": time.perf_counter() - t0 - seconds,
                      **r})
      print(json.dumps(records[-1]), flush=True)
      shutil.rmtree(d)

    text = corpus_text()
    corpus_file = os.path.join(tmp, "corpus.txt")
    with open(corpus_file, "w", encoding="utf-8") as f:
      f.write(text)
    sp_train = os.path.join(tmp, "sp_train.txt")
    with open(sp_train, "w", encoding="utf-8") as f:
      f.write(text[:2_000_000])
    t0 = time.perf_counter()
    model = tokenizers.train_sentencepiece([sp_train], 4096, os.path.join(tmp, "sp")).model_file
    sp_train_s = time.perf_counter() - t0
    for workers in (0, 1, 2):
      r = _run_child("tokenize", model, corpus_file, workers, seconds)
      records.append({"bench": "onthefly_sentencepiece", "sp_train_s": sp_train_s, **r})
      print(json.dumps(records[-1]), flush=True)

    for tok, size, file_bytes, per_shard in prepare_runs:
      src, out = os.path.join(tmp, f"text_{tok}"), os.path.join(tmp, f"prepared_{tok}")
      write_text_files(src, text, size, file_bytes)
      r = _run_child("prepare", src, out, "byte" if tok == "byte" else model, 2, per_shard)
      records.append({"bench": "prepare", "size_mb": size // MB, "file_bytes": file_bytes, **r})
      print(json.dumps(records[-1]), flush=True)
      shutil.rmtree(src)
      shutil.rmtree(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  for r in records:
    r["cpu_count"] = os.cpu_count()
  if a.quick:
    print("--quick: nothing written")
    return
  print(f"wrote {common.write_results(records, 'data')}")


if __name__ == "__main__":
  main()
