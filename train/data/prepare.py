"""Tokenize a corpus once into an on-disk token stream (`stream.py`), in parallel, resumable.

    bmojo-prepare --out data/stream/train --tokenizer byte --text /path/to/texts
    bmojo-prepare --out data/stream/train --corpus data/corpus --split train
    bmojo-prepare --out data/stream/c4 --tokenizer tok.model --array-record /data/c4/train.array_record-*
    bmojo-prepare --out data/stream/pg19 --tokenizer tok.model --tfds pg19 --data-dir ~/tensorflow_datasets

The documents are cut into shards of --docs-per-shard documents. Worker processes (--workers, default all
cores) tokenize a shard each (BOS + ids + EOS per document) and write it to `<out>/parts/part-<k>.bin` with its
document lengths; the main process records each finished shard in `<out>/progress.json`. A killed run resumes
where it stopped when rerun with the same arguments (finished shards are kept; a different plan in the same
folder is refused). When every shard is done the parts are concatenated, one at a time, into tokens.bin,
doc_offsets.npy and meta.json, and removed. Memory: one shard per worker, whatever the corpus size.
"""

import argparse
import multiprocessing
import os
import shutil
import signal
import sys
from typing import Any

import numpy as np
import tqdm

from bmojo_jax.train import files
from bmojo_jax.train.data import packing
from bmojo_jax.train.data import sources as sources_lib
from bmojo_jax.train.data import stream as stream_lib
from bmojo_jax.train.data import tokenizers

PROGRESS = "progress.json"
PARTS = "parts"

_worker: dict[str, Any] = {}


def _init_worker(documents, tokenizer: tokenizers.Tokenizer) -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the main process's to report, once
  _worker["documents"] = documents
  _worker["tokenizer"] = tokenizer


def _part_paths(out: str, shard: int) -> tuple[str, str]:
  base = os.path.join(out, PARTS, f"part-{shard:06d}")
  return base + ".bin", base + ".len.npy"


def _tokenize_shard(args: tuple[str, int, int, int]) -> tuple[int, int, int]:
  """Tokenizes documents [start, stop) into the shard's part files; returns (shard, documents, tokens)."""
  out, shard, start, stop = args
  documents, tokenizer = _worker["documents"], _worker["tokenizer"]
  dtype = stream_lib.token_dtype(tokenizer.vocab_size)
  pieces = [packing.encode(tokenizer, documents[i]) for i in range(start, stop)]
  lengths = np.asarray([p.size for p in pieces], np.int64)
  tokens = np.concatenate(pieces)
  if int(tokens.max()) >= tokenizer.vocab_size or int(tokens.min()) < 0:
    raise ValueError(f"shard {shard}: token ids in [{tokens.min()}, {tokens.max()}] fall outside the tokenizer's "
                     f"vocabulary [0, {tokenizer.vocab_size}).")
  tokens_path, lengths_path = _part_paths(out, shard)
  with files.open_nofollow(tokens_path + ".tmp", "wb") as f:   # written then renamed: no half part is left
    f.write(tokens.astype(dtype).tobytes())
  with files.open_nofollow(lengths_path + ".tmp", "wb") as f:
    np.save(f, lengths)
  os.replace(lengths_path + ".tmp", lengths_path)
  os.replace(tokens_path + ".tmp", tokens_path)
  return shard, int(lengths.size), int(tokens.size)


def _load_progress(out: str, plan: dict[str, Any]) -> set[int]:
  """Finished shards of an earlier run with the same plan (whose part files exist); a different plan raises."""
  path = files.inside(out, PROGRESS)
  if not os.path.lexists(path):
    if os.path.isdir(out) and set(os.listdir(out)) - {PARTS}:
      raise ValueError(f"{out} is not empty and holds no prepare progress ({PROGRESS}); choose a new folder.")
    return set()
  progress = files.read_json(path, f"Delete {out} and prepare again.")
  if progress["plan"] != plan:
    changed = [k for k in plan if progress["plan"].get(k) != plan[k]]
    if changed == ["inputs"]:
      changed = _changed_inputs(progress["plan"].get("inputs") or [], plan["inputs"])
    raise ValueError(f"{out} holds an unfinished prepare of another plan (differs in {changed}); rerun it with "
                     f"the same arguments and inputs to resume, or choose a new --out folder.")
  return {s for s in progress["done"] if all(os.path.exists(p) for p in _part_paths(out, s))}


def input_files(documents) -> list[dict[str, Any]]:
  """What a plan records of each input file of `documents` (text or ArrayRecord files): its path, size and
  sha256, so a resume with other inputs, or with a file changed since, is refused."""
  return [{"path": os.path.abspath(p), "size": os.path.getsize(p), "sha256": files.sha256(p)}
          for p in getattr(documents, "files", [])]


def _changed_inputs(before: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
  """The input files that differ between two plans, in words (the first three)."""
  old, new = {f["path"]: f for f in before}, {f["path"]: f for f in now}
  changed = ([f"{p} is new" for p in new if p not in old] + [f"{p} is gone" for p in old if p not in new] +
             [f"{p} changed" for p in new if p in old and new[p] != old[p]])
  return changed[:3] + ([f"{len(changed) - 3} more"] if len(changed) > 3 else []) or ["the order of the inputs"]


def prepare(documents, out: str, tokenizer, *, workers: int | None = None, docs_per_shard: int = 64,
            progress_bar: bool = True, stop_after_shards: int | None = None) -> dict[str, Any] | None:
  """Tokenizes `documents` (a random-access document source, see sources.py) into the stream folder `out`.

  Returns the stream's meta dict, or None when `stop_after_shards` (tests: a simulated interruption) stopped
  it early. An already finished stream of the same plan is returned as it is.
  """
  if docs_per_shard < 1:
    raise ValueError(f"docs_per_shard must be >= 1, got {docs_per_shard}.")
  n = len(documents)
  if n == 0:
    raise ValueError(f"No documents to prepare in {documents.describe()}.")
  tok_info = tokenizers.describe(tokenizer)
  plan = {"source": documents.describe(), "num_documents": n, "docs_per_shard": int(docs_per_shard),
          "tokenizer": tok_info, "inputs": input_files(documents)}
  meta_path = os.path.join(out, stream_lib.META)
  if os.path.exists(meta_path):
    meta = stream_lib.read_meta(out)
    if meta.get("plan") == plan:
      return meta
    raise ValueError(f"{out} already holds a finished stream of another plan; choose a new --out folder.")
  done = _load_progress(out, plan)
  os.makedirs(files.inside(out, PARTS), exist_ok=True)
  num_shards = -(-n // docs_per_shard)
  todo = [(out, k, k * docs_per_shard, min(n, (k + 1) * docs_per_shard)) for k in range(num_shards) if k not in done]
  if done and todo:
    print(f"{out}: resuming at document {todo[0][2]:,} of {n:,} ({len(done)} of {num_shards} shards were done "
          "by an earlier run).", file=sys.stderr)
  if stop_after_shards is not None:
    todo = todo[:stop_after_shards]
  workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
  bar = tqdm.tqdm(total=n, initial=sum(min(n, (k + 1) * docs_per_shard) - k * docs_per_shard for k in done),
                  unit="doc", desc=f"prepare {os.path.basename(os.path.normpath(out))}", disable=not progress_bar)
  tokens_done = 0

  def record(result):
    nonlocal tokens_done
    shard, docs, toks = result
    done.add(shard)
    tokens_done += toks
    files.write_json(files.inside(out, PROGRESS), {"plan": plan, "done": sorted(done)}, indent=1)
    bar.update(docs)
    bar.set_postfix(tokens=f"{tokens_done / 1e6:.1f}M")

  try:
    if workers == 1:
      _init_worker(documents, tokenizer)
      for args in todo:
        record(_tokenize_shard(args))
    elif todo:
      ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold jax / grain threads
      with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(documents, tokenizer)) as pool:
        for result in pool.imap_unordered(_tokenize_shard, todo):
          record(result)
  finally:
    bar.close()
  if len(done) < num_shards:
    return None
  return _concatenate(out, num_shards, tokenizer.vocab_size, tok_info, plan)


def _concatenate(out: str, num_shards: int, vocab_size: int, tok_info: dict, plan: dict) -> dict[str, Any]:
  """Streams the parts in order into the stream files (one part in memory at a time), then removes them."""
  writer = stream_lib.StreamWriter(out, vocab_size)
  for k in range(num_shards):
    tokens_path, lengths_path = _part_paths(out, k)
    writer.add(np.fromfile(tokens_path, dtype=writer.dtype), np.load(lengths_path))
  meta = writer.close(tok_info, plan["source"], plan=plan)
  shutil.rmtree(os.path.join(out, PARTS))
  os.remove(os.path.join(out, PROGRESS))
  return meta


def documents_from_args(args) -> Any:
  given = [name for name in ("text", "corpus", "array_record", "tfds") if getattr(args, name)]
  if len(given) != 1:
    raise ValueError("name exactly one input: --text, --corpus, --array-record or --tfds.")
  split = lambda s: [p.strip() for p in s.split(",") if p.strip()]
  if args.text:
    return sources_lib.TextFileDocuments(split(args.text), tuple(split(args.patterns)))
  if args.corpus:
    from bmojo_jax.train.data import corpus  # pylint: disable=g-import-not-at-top
    return sources_lib.TextFileDocuments([corpus.split_dir(args.corpus, args.split)], ("*.txt",))
  if args.array_record:
    return sources_lib.ArrayRecordDocuments(split(args.array_record), args.text_key or "")
  return sources_lib.TfdsDocuments(args.tfds, args.split, data_dir=args.data_dir or None,
                                   text_key=args.text_key or "text")


class _OneLineParser(argparse.ArgumentParser):
  """An option error in one line (argparse prints the whole usage before it)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: {message} (--help lists the options)\n")


def main(argv=None) -> None:
  parser = _OneLineParser(prog="bmojo-prepare", description=__doc__.split("\n\n")[0],
                          epilog="Train on it: bmojo-train ... --config.data.kind=stream "
                                 "--config.data.stream_dir=<out> (docs/data.md).")
  parser.add_argument("--out", required=True, help="stream folder to write (resumes an unfinished one)")
  parser.add_argument("--tokenizer", default="byte", help="byte (default) or a SentencePiece .model file")
  parser.add_argument("--text", default="", help="comma-separated text files / directories (one document a file)")
  parser.add_argument("--patterns", default="*.txt,*.md,*.rst,*.py", help="file patterns searched in directories")
  parser.add_argument("--corpus", default="", help="a corpus folder of `python -m bmojo_jax.train.data.corpus prepare`")
  parser.add_argument("--array-record", default="", help="comma-separated ArrayRecord files or directories")
  parser.add_argument("--tfds", default="", help="a prepared tfds dataset name, e.g. pg19 (never downloads)")
  parser.add_argument("--split", default="train", help="--corpus / --tfds split (default train)")
  parser.add_argument("--data-dir", default="", help="--tfds data_dir")
  parser.add_argument("--text-key", default="", help="--tfds feature (default text); --array-record: records "
                      "are JSON objects with this field (default: records are UTF-8 text)")
  parser.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
  parser.add_argument("--docs-per-shard", type=int, default=64, help="documents per part file (default 64)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--debug", action="store_true", help="show an error's traceback instead of its summary")
  args = parser.parse_args(argv)
  if args.workers is not None and args.workers < 1:
    sys.exit(f"bmojo-prepare: --workers {args.workers}: give at least 1 tokenizing process.")
  if os.path.lexists(args.out) and not os.path.isdir(args.out):
    sys.exit(f"bmojo-prepare: --out {args.out} is a file, not a folder: name a folder (it is created if missing).")
  try:
    tokenizer = tokenizers.from_spec(args.tokenizer)
    documents = documents_from_args(args)
    meta = prepare(documents, args.out, tokenizer, workers=args.workers, docs_per_shard=args.docs_per_shard,
                   progress_bar=not args.no_progress)
  except (FileNotFoundError, ValueError, ImportError) as e:
    sys.exit(f"bmojo-prepare: {e}")
  except (OSError, files.WriteError) as e:    # a full disk, a folder without permission
    cause = e.cause if isinstance(e, files.WriteError) else files.failure_cause(e)
    where = getattr(e, "path", None) or getattr(e, "filename", None) or args.out
    sys.exit(f"bmojo-prepare: writing {where} failed: {cause}.\n{files.FIXES.get(cause, 'Fix it')} and rerun the "
             "same command: it resumes from the shards already done.")
  except KeyboardInterrupt:
    print(f"bmojo-prepare: interrupted; the finished shards are kept in {args.out}: rerun the same command to "
          "resume.", file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    if args.debug:
      raise
    sys.exit(f"bmojo-prepare: unexpected {files.brief(e)}\nRerun with --debug for the traceback, and report it if "
             "the cause is not yours.")
  print(f"{args.out}: {meta['num_tokens']:,} tokens ({meta['dtype']}) in {meta['num_documents']:,} documents "
        f"of {meta['source']}")


if __name__ == "__main__":
  main()
