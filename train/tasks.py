"""Data of a training run from its config: sources, tokenizer, and the facts results.json reports.

`data.kind` is "mqar" (Zoology's task, generated on the fly), "text" (local files packed into sequences),
"corpus" (the train / eval splits of a corpus prepared by `python -m bmojo_jax.train.data.corpus prepare`, as text),
"stream" (a token stream prepared once by `bmojo-prepare`, read memory-mapped), or "array_record" / "tfds"
(documents tokenized and packed on the fly by grain transforms; docs/data.md).
The tokenizer of a text run is named by data.tokenizer (`tokenizers.from_spec`).
"""

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from bmojo_jax.train.data import corpus
from bmojo_jax.train.data import mqar
from bmojo_jax.train.data import packing
from bmojo_jax.train.data import pipeline
from bmojo_jax.train.data import recall
from bmojo_jax.train.data import sources
from bmojo_jax.train.data import stream
from bmojo_jax.train.data import text
from bmojo_jax.train.data import tokenizers

KINDS = ("mqar", "text", "corpus", "stream", "array_record", "tfds")


@dataclasses.dataclass
class Task:
  """What the trainer needs from the data side."""
  kind: str
  train_source: Any
  eval_source: Any
  seq_len: int
  vocab_size: int                     # ids the data can contain: the model's vocab must cover them
  tokenizer: Any | None = None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  supervised_per_example: int | None = None  # most targets of an example that are scored (MQAR: N); None: all
  val_source: Any | None = None       # the held-out validation split (MQAR with data.num_val > 0), else None


class _Slice:
  """Random-access view of source[start:stop]."""

  def __init__(self, source, start: int, stop: int):
    self._source, self._start, self._len = source, start, stop - start

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int):
    if not 0 <= int(i) < self._len:
      raise IndexError(f"index {i} out of range [0, {self._len}).")
    return self._source[self._start + int(i)]


class _Concat:
  """Random-access view of `first` followed by `second` (the training iterator shuffles them together)."""

  def __init__(self, first, second):
    self._first, self._second = first, second

  def __len__(self) -> int:
    return len(self._first) + len(self._second)

  def __getitem__(self, i: int):
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"index {i} out of range [0, {len(self)}).")
    return self._first[i] if i < len(self._first) else self._second[i - len(self._first)]


class _Spread:
  """Random-access view of `count` evenly spaced items of source (a smaller test set drawn from all of it)."""

  def __init__(self, source, count: int):
    self._source, self._index = source, np.linspace(0, len(source) - 1, count).round().astype(np.int64)

  def __len__(self) -> int:
    return int(self._index.size)

  def __getitem__(self, i: int):
    if not 0 <= int(i) < len(self):
      raise IndexError(f"index {i} out of range [0, {len(self)}).")
    return self._source[int(self._index[int(i)])]


def _split_list(value: str) -> list[str]:
  return [p.strip() for p in str(value or "").split(",") if p.strip()]


def make_task(config: ml_collections.ConfigDict) -> Task:
  """Builds the sources; missing paths and impossible task settings raise here, before any training."""
  d = config.data
  if d.kind != "mqar" and "tokenizer" not in d:
    raise ValueError(f"data.kind={d.kind!r} needs a text config (data.tokenizer, data.paths, ...), and this one "
                     "has only MQAR's fields: use --config configs/lm.py (e.g. configs/lm.py:bmojo,cpu; docs/lm.md).")
  if d.kind == "mqar" and "num_train" not in d:
    raise ValueError("data.kind='mqar' needs an MQAR config (data.num_train, data.num_kv_pairs, ...), and this one is "
                     "a text config: use --config configs/mqar.py (docs/mqar.md).")
  if d.kind not in KINDS:
    raise ValueError(f"data.kind={d.kind!r} is unknown; choose one of {', '.join(KINDS)}.")
  if d.kind == "mqar":
    return _mqar_task(config)
  fraction = float(d.get("recall_fraction") or 0.0)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"data.recall_fraction={fraction} must be in [0, 1): the share of training sequences that are "
                     "synthetic recall documents (train/data/recall.py).")
  if fraction and d.kind not in ("text", "corpus"):
    raise ValueError(f"data.recall_fraction mixes recall documents into text read in memory: data.kind=text or "
                     f"corpus, not {d.kind!r}.")
  tokenizer = tokenizers.from_spec(d.tokenizer)
  if d.kind == "stream":
    return _stream_task(config, tokenizer)
  if d.kind in ("array_record", "tfds"):
    return _document_task(config, tokenizer)
  return _text_task(config, tokenizer)


def _mqar_task(config: ml_collections.ConfigDict) -> Task:
  """data.kind=mqar: Zoology's task, examples generated from their index (train and test by their seeds)."""
  d = config.data
  for name in ("num_train", "num_test"):
    if int(d[name]) < 1:
      raise ValueError(f"data.{name}={d[name]} must be >= 1.")
    if int(d[name]) >= 2**31:
      raise ValueError(f"data.{name}={d[name]} is too many examples (at most 2**31 - 1: the examples are "
                       "indexed by int32, and a pass over them would never end); lower it.")
  vocab = config.model.vocab_size if d.get("vocab_size") is None else d.vocab_size
  mq = mqar.MQARConfig(vocab_size=int(vocab), seq_len=int(d.seq_len),
                       num_kv_pairs=int(d.num_kv_pairs), power_a=float(d.power_a))
  train = mqar.MQARSource(mq, num_examples=int(d.num_train), seed=int(d.train_seed))
  test = mqar.MQARSource(mq, num_examples=int(d.num_test), seed=int(d.test_seed))
  info = {"L": mq.seq_len, "N": mq.num_kv_pairs, "vocab": mq.vocab_size, "power_a": mq.power_a,
          "num_train": len(train), "num_test": len(test)}
  val, num_val = None, int(d.get("num_val", 0) or 0)
  if num_val < 0 or num_val >= 2**31:
    raise ValueError(f"data.num_val={num_val} must be in [0, 2**31) (0: no validation split).")
  if num_val:       # its own stream: no example is shared with the training or the test set
    val_seed = int(d.val_seed)
    if val_seed in (int(d.train_seed), int(d.test_seed)):
      raise ValueError(f"data.val_seed={val_seed} must differ from data.train_seed={d.train_seed} and "
                       f"data.test_seed={d.test_seed}: the validation split is a stream of its own.")
    val = mqar.MQARSource(mq, num_examples=num_val, seed=val_seed)
    info["num_val"] = num_val
  return Task("mqar", train, test, mq.seq_len, mq.vocab_size, None, info, supervised_per_example=mq.num_kv_pairs,
              val_source=val)


def _text_task(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer) -> Task:
  """data.kind=text / corpus: local files packed in memory; eval from data.eval_paths (the corpus's eval split),
  or the last eval_fraction of the sequences."""
  d = config.data
  paths, eval_paths, patterns = text_paths(config)
  if not paths:
    raise ValueError("data.paths is empty: name the text files or directories to train on (or train on the "
                     "prepared corpus: --config.data.kind=corpus, docs/lm.md).")
  decoding = text_decoding(config)
  documents = text.read_text_files(paths, patterns, **decoding)
  source = packing.pack_documents(documents, tokenizer, int(d.seq_len))
  if eval_paths:
    train, test = source, text.make_text_source(eval_paths, int(d.seq_len), tokenizer, patterns, **decoding)
  else:
    train, test = _hold_out(source, d)
  test = _spread(test, d)
  info = {"seq_len": int(d.seq_len), "tokens": source.num_tokens, "train_sequences": len(train),
          "eval_sequences": len(test), "tokenizer": str(d.tokenizer)}
  if d.kind == "corpus":
    info["corpus_dir"] = str(d.corpus_dir)
  fraction = float(d.get("recall_fraction") or 0.0)
  if fraction:
    # the haystack: the documents wholly before the held-out sequences (all of them with an eval set)
    end = len(train) * int(d.seq_len) if not eval_paths else source.num_tokens
    ends = np.append(source.doc_starts[1:], source.num_tokens)
    haystack = " ".join(doc for doc, stop in zip(documents, ends) if stop <= end)
    count = int(round(len(train) * fraction / (1.0 - fraction)))
    recall_docs = recall.RecallSource(haystack, tokenizer, int(d.seq_len), max(1, count), int(config.seed))
    info.update(recall_fraction=fraction, recall_sequences=len(recall_docs), text_sequences=len(train))
    train = _Concat(train, recall_docs)
    info["train_sequences"] = len(train)
  return Task("text", train, test, int(d.seq_len), int(tokenizer.vocab_size), tokenizer, info)


def _stream_task(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer) -> Task:
  """data.kind=stream: packed sequences read memory-mapped from a folder of `bmojo-prepare`; eval from
  data.eval_stream_dir, or the last eval_fraction of the sequences."""
  d = config.data
  stream_dir = str(d.get("stream_dir") or "")
  if not stream_dir:
    raise ValueError("data.kind=stream needs data.stream_dir, a folder written by "
                     f"`{stream.PREPARE_HINT.format(dir='<dir>')}`.")
  source = stream.PackedStreamSource(stream_dir, int(d.seq_len), tokenizer)
  eval_dir = str(d.get("eval_stream_dir") or "")
  if eval_dir:
    train, test = source, stream.PackedStreamSource(eval_dir, int(d.seq_len), tokenizer)
  else:
    train, test = _hold_out(source, d)
  test = _spread(test, d)
  info = {"seq_len": int(d.seq_len), "tokens": source.num_tokens, "documents": int(source.meta["num_documents"]),
          "train_sequences": len(train), "eval_sequences": len(test), "tokenizer": str(d.tokenizer),
          "stream_dir": stream_dir, "source": source.meta.get("source", "")}
  return Task("text", train, test, int(d.seq_len), int(tokenizer.vocab_size), tokenizer, info)


def _document_source(config: ml_collections.ConfigDict, split: str):
  """The documents of data.kind=array_record / tfds for `split` ("train" or "eval"); None when no eval set is
  named (the caller holds out a fraction)."""
  d = config.data
  text_key = str(d.get("text_key") or "")
  if d.kind == "array_record":
    paths = _split_list(d.get("array_record_paths" if split == "train" else "eval_array_record_paths"))
    if not paths:
      if split == "train":
        raise ValueError("data.kind=array_record needs data.array_record_paths (comma-separated files or folders).")
      return None
    return sources.ArrayRecordDocuments(paths, text_key)
  name = str(d.get("tfds_name") or "")
  if not name:
    raise ValueError("data.kind=tfds needs data.tfds_name (e.g. pg19), prepared beforehand.")
  tfds_split = str(d.get("tfds_split") or "train") if split == "train" else str(d.get("tfds_eval_split") or "")
  if not tfds_split:
    return None
  return sources.TfdsDocuments(name, tfds_split, data_dir=str(d.get("tfds_data_dir") or "") or None,
                               text_key=text_key or "text")


def _document_task(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer) -> Task:
  """data.kind=array_record / tfds: documents tokenized and packed on the fly (grain transforms) for training;
  the eval documents (an eval set, or the last eval_fraction of the documents), at most
  data.max_eval_documents of them, are packed in memory once so evaluation is an exact pass."""
  d = config.data
  documents = _document_source(config, "train")
  eval_documents = _document_source(config, "eval")
  if eval_documents is None:
    n = len(documents)
    n_eval = max(1, int(round(n * float(d.eval_fraction))))
    if n - n_eval < 1:
      raise ValueError(f"data: {n} documents leave none for training after holding out eval_fraction="
                       f"{d.eval_fraction}; add documents or name an eval set.")
    documents, eval_documents = (sources.DocumentSlice(documents, 0, n - n_eval),
                                 sources.DocumentSlice(documents, n - n_eval, n))
  max_docs = int(d.get("max_eval_documents") or 0)
  count = len(eval_documents) if max_docs <= 0 else min(max_docs, len(eval_documents))
  test = packing.pack_documents((eval_documents[i] for i in range(count)), tokenizer, int(d.seq_len))
  train = packing.OnTheFlySource(documents, tokenizer, int(d.seq_len))
  eval_tokens = test.num_tokens
  test = _spread(test, d)
  info = {"seq_len": int(d.seq_len), "train_documents": len(documents), "eval_documents": count,
          "eval_tokens": eval_tokens, "eval_sequences": len(test), "tokenizer": str(d.tokenizer),
          "source": documents.describe()}
  return Task("text", train, test, int(d.seq_len), int(tokenizer.vocab_size), tokenizer, info)


def _hold_out(source, d) -> tuple[Any, Any]:
  """(train, eval) views of a packed source: eval is its last eval_fraction of sequences."""
  n = len(source)
  n_eval = max(1, int(round(n * float(d.eval_fraction))))
  if n - n_eval < 1:
    raise ValueError(f"data: {n} packed sequences of {d.seq_len} tokens leave none for training after "
                     f"holding out eval_fraction={d.eval_fraction}; add text or lower data.seq_len.")
  return _Slice(source, 0, n - n_eval), _Slice(source, n - n_eval, n)


def _spread(test, d):
  max_eval = int(d.get("max_eval_sequences") or 0)
  return _Spread(test, max_eval) if 0 < max_eval < len(test) else test


def text_decoding(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{"encoding", "errors"} of a text run's files: data.encoding / data.errors, strict UTF-8 when unset."""
  d = config.data
  return {"encoding": str(d.get("encoding") or text.DEFAULT_ENCODING),
          "errors": str(d.get("errors") or text.DEFAULT_ERRORS)}


def text_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The file patterns a run searches folders for: data.patterns, `text.DEFAULT_PATTERNS` when unset."""
  return tuple(_split_list(config.data.get("patterns"))) or text.DEFAULT_PATTERNS


def text_paths(config: ml_collections.ConfigDict) -> tuple[list[str], list[str], tuple[str, ...]]:
  """(training paths, eval paths, file patterns) of a text or corpus run's data config."""
  d = config.data
  patterns = text_patterns(config)
  if d.kind == "corpus":
    return *corpus_paths(config), patterns
  return _split_list(d.paths), _split_list(d.eval_paths), patterns


def corpus_paths(config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """([train folder], [eval folder]) of `data.corpus_dir` for data.kind=corpus; a clear error when the corpus
  is not prepared or data.paths / eval_paths are also set (they would be ignored)."""
  d = config.data
  if _split_list(d.get("paths")) or _split_list(d.get("eval_paths")):
    raise ValueError("data.kind=corpus reads data.corpus_dir; data.paths / data.eval_paths are for "
                     "data.kind=text: set one or the other.")
  corpus_dir = str(d.get("corpus_dir") or "")
  if not corpus_dir:
    raise ValueError("data.kind=corpus needs data.corpus_dir (e.g. data/corpus).")
  return [corpus.split_dir(corpus_dir, "train")], [corpus.split_dir(corpus_dir, "eval")]


def check_batch(batch: dict[str, np.ndarray], vocab_size: int, what: str) -> None:
  """Out-of-range token ids in `batch` fail before it reaches a step, naming `what`, the field and the vocabulary
  (the trainer checks the first test batch and every training batch)."""
  try:
    pipeline.validate_token_ids(batch, vocab_size)
  except ValueError as e:
    raise ValueError(f"{what}: {e}") from None
