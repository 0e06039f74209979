"""Data of a training run from its config: sources, tokenizer, and the facts results.json reports.

`data.kind` is "mqar" (Zoology's task, generated on the fly) or "text" (local files packed into sequences).
The tokenizer of a text run is described by a small JSON dict saved in the workdir (`tokenizer_info`) so
`bmojo-generate` can rebuild it (`load_tokenizer`); a SentencePiece model file is copied there.
"""

import dataclasses
import os
import shutil
from typing import Any

import ml_collections
import numpy as np

from train import data as data_lib


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


def _split_list(value: str) -> list[str]:
  return [p.strip() for p in str(value or "").split(",") if p.strip()]


def make_tokenizer(spec: str):
  if spec == "byte":
    return data_lib.ByteTokenizer()
  if not os.path.exists(spec):
    raise FileNotFoundError(f"data.tokenizer={spec!r}: not 'byte' and no such SentencePiece model file.")
  return data_lib.SentencePieceTokenizer(spec)


def tokenizer_info(tokenizer) -> dict[str, Any]:
  if tokenizer is None:
    return {"kind": "none"}
  if isinstance(tokenizer, data_lib.ByteTokenizer):
    return {"kind": "byte", "vocab_size": tokenizer.vocab_size}
  return {"kind": "sentencepiece", "model_file": "tokenizer.model", "vocab_size": tokenizer.vocab_size}


def save_tokenizer(tokenizer, workdir: str) -> dict[str, Any]:
  """Writes what `load_tokenizer` needs into the workdir; returns the info dict (saved by the caller)."""
  info = tokenizer_info(tokenizer)
  if info["kind"] == "sentencepiece":
    shutil.copyfile(tokenizer.model_file, os.path.join(workdir, info["model_file"]))
  return info


def load_tokenizer(info: dict[str, Any], workdir: str):
  """The tokenizer of a run from its saved info; None for token-id tasks (MQAR)."""
  kind = info.get("kind", "none")
  if kind == "byte":
    return data_lib.ByteTokenizer()
  if kind == "sentencepiece":
    return data_lib.SentencePieceTokenizer(os.path.join(workdir, info["model_file"]))
  return None


def make_task(config: ml_collections.ConfigDict) -> Task:
  """Builds the sources; missing paths and impossible task settings raise here, before any training."""
  d = config.data
  if d.kind == "mqar":
    vocab = config.model.vocab_size if d.get("vocab_size") is None else d.vocab_size
    mq = data_lib.MQARConfig(vocab_size=int(vocab), seq_len=int(d.seq_len),
                             num_kv_pairs=int(d.num_kv_pairs), power_a=float(d.power_a))
    train = data_lib.MQARSource(mq, num_examples=int(d.num_train), seed=int(d.train_seed))
    test = data_lib.MQARSource(mq, num_examples=int(d.num_test), seed=int(d.test_seed))
    info = {"L": mq.seq_len, "N": mq.num_kv_pairs, "vocab": mq.vocab_size, "power_a": mq.power_a,
            "num_train": len(train), "num_test": len(test)}
    return Task("mqar", train, test, mq.seq_len, mq.vocab_size, None, info, supervised_per_example=mq.num_kv_pairs)
  if d.kind == "text":
    tokenizer = make_tokenizer(d.tokenizer)
    patterns = tuple(_split_list(d.patterns)) or data_lib.text.DEFAULT_PATTERNS
    paths = _split_list(d.paths)
    if not paths:
      raise ValueError("data.paths is empty: name the text files or directories to train on.")
    source = data_lib.make_text_source(paths, int(d.seq_len), tokenizer, patterns)
    eval_paths = _split_list(d.eval_paths)
    if eval_paths:
      train, test = source, data_lib.make_text_source(eval_paths, int(d.seq_len), tokenizer, patterns)
    else:
      n = len(source)
      n_eval = max(1, int(round(n * float(d.eval_fraction))))
      if n - n_eval < 1:
        raise ValueError(f"data: {n} packed sequences of {d.seq_len} tokens leave none for training after "
                         f"holding out eval_fraction={d.eval_fraction}; add text or lower data.seq_len.")
      train, test = _Slice(source, 0, n - n_eval), _Slice(source, n - n_eval, n)
    info = {"seq_len": int(d.seq_len), "tokens": int(getattr(source, "num_tokens", 0)),
            "train_sequences": len(train), "eval_sequences": len(test), "tokenizer": str(d.tokenizer)}
    return Task("text", train, test, int(d.seq_len), int(tokenizer.vocab_size), tokenizer, info)
  raise ValueError(f"data.kind={d.kind!r} is unknown; choose mqar or text.")


def check_first_batch(batch: dict[str, np.ndarray], vocab_size: int, what: str) -> None:
  """Out-of-range token ids fail before training, naming the field and the vocabulary."""
  try:
    data_lib.validate_token_ids(batch, vocab_size)
  except ValueError as e:
    raise ValueError(f"{what}: {e}") from None
