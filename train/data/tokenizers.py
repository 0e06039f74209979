"""Tokenizers, and the one description of a tokenizer that a run's tokenizer.json and a token stream record.

Tokenizers share one interface (`Tokenizer`): `encode(str) -> list[int]`, `encode_array(str) -> int32[n]`,
`decode(ids) -> str`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`.
  * `ByteTokenizer` (default): ids 0 … 255 are UTF-8 bytes, then PAD = 256, BOS = 257, EOS = 258.
  * `SentencePieceTokenizer`: a model trained locally with `train_sentencepiece` (needs the optional
    `sentencepiece` package).

A config names a tokenizer by a spec (`data.tokenizer`, `bmojo-prepare --tokenizer`): "byte" or a
SentencePiece .model file (`from_spec`). What is recorded of it is a description (`describe`):
    {"kind": "byte" | "sentencepiece" | "none", "vocab_size", "bos_id", "eos_id", "pad_id",
     "sha256": the model file's (None for bytes), "model_file": where the model lies (sentencepiece only)}
A token stream's meta.json records it with the model's absolute path; a run's tokenizer.json with the copy of
the model saved in the workdir (`save`), from which `from_description` rebuilds the tokenizer. `check` compares
a description with a tokenizer over the keys it records (a tokenizer.json written before the description grew
records only kind and vocab_size, and loads as before).
"""

import dataclasses
import os
import shutil
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from bmojo_jax.train import files as files_lib

KEYS = ("kind", "vocab_size", "bos_id", "eos_id", "pad_id", "sha256")
MODEL_FILE = "tokenizer.model"       # the SentencePiece model's copy in a workdir


class Tokenizer(Protocol):
  """What packing and the trainer need from a tokenizer."""
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    ...

  def encode_array(self, text: str) -> np.ndarray:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0 … 255 are bytes; PAD = 256, BOS = 257, EOS = 258; vocab_size = 259."""
  pad_id: int = 256
  bos_id: int = 257
  eos_id: int = 258

  @property
  def vocab_size(self) -> int:
    return 259

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_array(self, text: str) -> np.ndarray:
    """`encode` as int32[n], without a Python list."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Drops special and out-of-range ids; invalid UTF-8 becomes U+FFFD."""
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")


def _import_sentencepiece():
  try:
    import sentencepiece  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "SentencePiece tokenizers need the optional `sentencepiece` package: "
        "pip install 'bmojo_jax[sentencepiece]' (or pip install sentencepiece).") from e
  return sentencepiece


class SentencePieceTokenizer:
  """A SentencePiece model behind the `Tokenizer` interface (needs `sentencepiece`). Pickles as its model file's
  path (grain's worker processes and `bmojo-prepare`'s pool load the model again)."""

  def __init__(self, model_file: str):
    if not os.path.exists(model_file):
      raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
    spm = _import_sentencepiece()
    self.model_file = model_file
    self._sp = spm.SentencePieceProcessor(model_file=model_file)
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    self.pad_id = int(self._sp.pad_id())
    for name, value in (("bos_id", self.bos_id), ("eos_id", self.eos_id), ("pad_id", self.pad_id)):
      if value < 0:
        raise ValueError(f"SentencePiece model {model_file} has no {name} (got {value}); train it "
                         "with train_sentencepiece, which defines BOS, EOS and PAD.")

  def __getstate__(self):
    return {"model_file": self.model_file}

  def __setstate__(self, state):
    self.__init__(state["model_file"])

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


def train_sentencepiece(files: Sequence[str], vocab_size: int, model_prefix: str, *,
                        model_type: str = "bpe", character_coverage: float = 1.0,
                        max_sentence_length: int = 16384) -> SentencePieceTokenizer:
  """Trains a SentencePiece model on local text files; writes `{model_prefix}.model` / `.vocab`.

  Ids: UNK = 0, BOS = 1, EOS = 2, PAD = 3. Text is not normalized (whitespace and newlines kept) and
  unseen characters fall back to their UTF-8 bytes (256 byte pieces, so vocab_size must exceed ~260),
  so decode(encode(s)) == s. Returns the trained tokenizer.
  """
  paths = [str(f) for f in files]
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"Text path does not exist: {path}")
  spm = _import_sentencepiece()
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      input=",".join(paths), model_prefix=model_prefix, vocab_size=vocab_size,
      model_type=model_type, character_coverage=character_coverage,
      max_sentence_length=max_sentence_length, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
      byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_digits=True, minloglevel=2)
  return SentencePieceTokenizer(model_prefix + ".model")


def from_spec(spec: str) -> Tokenizer:
  """'byte' -> ByteTokenizer; a path -> SentencePieceTokenizer (FileNotFoundError naming the spec if missing)."""
  if spec == "byte":
    return ByteTokenizer()
  if not os.path.exists(spec):
    raise FileNotFoundError(f"data.tokenizer={spec!r}: not 'byte' and no such SentencePiece model file.")
  return SentencePieceTokenizer(spec)


def describe(tokenizer: Tokenizer | None, model_file: str | None = None) -> dict[str, Any]:
  """The description of `tokenizer` (see the module docstring); `model_file` names where a SentencePiece model
  is recorded to lie (default: its file's absolute path). None (a token-id task such as MQAR) is kind "none"."""
  if tokenizer is None:
    return {"kind": "none"}
  ids = {"vocab_size": int(tokenizer.vocab_size), "bos_id": int(tokenizer.bos_id),
         "eos_id": int(tokenizer.eos_id), "pad_id": int(tokenizer.pad_id)}
  if isinstance(tokenizer, ByteTokenizer):
    return {"kind": "byte", **ids, "sha256": None}
  return {"kind": "sentencepiece", **ids, "sha256": files_lib.sha256(tokenizer.model_file),
          "model_file": model_file or os.path.abspath(tokenizer.model_file)}


def check(recorded: dict[str, Any], tokenizer: Tokenizer | None, where: str, fix: str) -> None:
  """ValueError naming every difference when `recorded` (a description) is not `tokenizer`'s, over the keys of
  KEYS that `recorded` holds; `where` begins the message (what recorded it), `fix` ends it (what to do)."""
  want = describe(tokenizer)
  diff = [k for k in KEYS if k in recorded and recorded[k] != want.get(k)]
  if diff:
    raise ValueError(f"{where}: " + ", ".join(f"{k} {recorded[k]!r} there vs {want.get(k)!r} here" for k in diff)
                     + f". {fix}")


def save(tokenizer: Tokenizer | None, workdir: str) -> dict[str, Any]:
  """Copies a SentencePiece model into `workdir` (as MODEL_FILE); returns the description naming the copy (what
  the caller writes to tokenizer.json and `from_description` reads back)."""
  description = describe(tokenizer, MODEL_FILE)
  if description["kind"] == "sentencepiece":
    shutil.copyfile(tokenizer.model_file, files_lib.inside(workdir, MODEL_FILE))   # refuses a planted link
  return description


def from_description(description: dict[str, Any], workdir: str) -> Tokenizer | None:
  """The tokenizer a run's tokenizer.json describes (None for kind "none": token-id tasks such as MQAR), checked
  against the description. Its model file must lie in the workdir, reached through no symbolic link
  (files.UnsafePathError, a ValueError, otherwise): a workdir's files never lead to reading files outside it."""
  kind = description.get("kind", "none")
  if kind == "none":
    return None
  if kind == "byte":
    tokenizer = ByteTokenizer()
  elif kind == "sentencepiece":
    tokenizer = SentencePieceTokenizer(files_lib.inside(workdir, description["model_file"], "tokenizer.json"))
  else:
    raise ValueError(f"{os.path.join(workdir, 'tokenizer.json')} names tokenizer kind {kind!r}; this code knows "
                     "byte and sentencepiece.")
  check(description, tokenizer, f"{os.path.join(workdir, 'tokenizer.json')} describes another tokenizer than the "
        "model file it names",
        "Copy the run's SentencePiece model back to it, or rerun bmojo-train with the run's --config.")
  return tokenizer
