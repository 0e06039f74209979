"""Text for language modeling: document sources, and packing into fixed-length sequences (tokenizers:
`tokenizers.py`).

Documents come from local files/directories (`read_text_files`) or, optionally, a tfds dataset
(`tfds_documents`, needs `tensorflow_datasets` and the prepared data). Files are read as strict UTF-8 unless
an encoding and an error policy are named (`data.encoding`, `data.errors`): a file that does not decode
raises `TextDecodeError` naming the file and the byte offset, so no text is altered silently. Empty files
found in a directory are skipped; an empty file named on its own, or no text at all, raises `EmptyTextError`
naming it.

Packing (`pack_documents` → `PackedTextSource`): every document becomes BOS + tokens + EOS; the documents
are concatenated into one token stream and read as windows of T+1 tokens with stride T, so every token
after the first is a target exactly once. Sequence j holds
    inputs       int32[T]  stream[jT : jT+T]
    targets      int32[T]  stream[jT+1 : jT+T+1]; -100 where the next token starts another document
                           (the EOS → next BOS transition) and on padding
    segment_ids  int32[T]  document index within the sequence, from 1; 0 on padding
    positions    int32[T]  position of the token within its document (BOS is 0); 0 on padding
The last sequence is padded with PAD. The packed stream is one numpy array, so the source is
random-access and a grain iterator over it checkpoints as a single index.
"""

import glob
import os
from typing import Iterable, Sequence

import numpy as np

from train.data.tokenizers import ByteTokenizer
from train.data.tokenizers import Tokenizer

IGNORE_INDEX = -100
DEFAULT_PATTERNS = ("*.txt", "*.md", "*.rst", "*.py")
DEFAULT_ENCODING = "utf-8"
DEFAULT_ERRORS = "strict"          # or "replace" (U+FFFD), "ignore", ... (Python's codec error handlers)


class TextDecodeError(ValueError):
  """A text file is not valid in the encoding it is read with; the message names the file and byte offset."""


class EmptyTextError(ValueError):
  """A named text file, or every file found, is empty."""


def _check_paths_exist(paths: Sequence[str]) -> None:
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"Text path does not exist: {path}")


def list_text_files(paths: Sequence[str] | str,
                    patterns: Sequence[str] = DEFAULT_PATTERNS) -> list[str]:
  """Files named by `paths`: files as given, directories searched recursively for `patterns`.

  Every path is checked first: a missing one raises FileNotFoundError naming it. A directory with no
  matching file raises FileNotFoundError naming the directory and patterns. Empty files found in a directory
  are skipped; an empty file named in `paths`, or a directory whose matching files are all empty, raises
  EmptyTextError naming it. Returns a sorted, de-duplicated list (directory contents sorted; explicit files
  keep their given order first).
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [os.fspath(p) for p in paths]
  _check_paths_exist(paths)
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = set()
      for pattern in patterns:
        found.update(glob.glob(os.path.join(path, "**", pattern), recursive=True))
      found = sorted(f for f in found if os.path.isfile(f))
      if not found:
        raise FileNotFoundError(f"No files matching {list(patterns)} under directory: {path}")
      with_text = [f for f in found if os.path.getsize(f) > 0]
      if not with_text:
        raise EmptyTextError(f"No text under directory {path}: its {len(found)} file(s) matching "
                             f"{list(patterns)} are all empty.")
      files.extend(with_text)
    else:
      if os.path.getsize(path) == 0:
        raise EmptyTextError(f"Text file is empty: {path}")
      files.append(path)
  return list(dict.fromkeys(files))


def read_text_file(path: str, encoding: str = DEFAULT_ENCODING, errors: str = DEFAULT_ERRORS) -> str:
  """One file's text. Strict UTF-8 by default: bytes that do not decode raise TextDecodeError naming the file
  and the byte offset (give `encoding`, e.g. "latin-1", or `errors="replace"` to read such a file)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode(encoding, errors)
  except UnicodeDecodeError as e:
    raise TextDecodeError(
        f"{path}: not valid {encoding} at byte {e.start} ({e.reason}, bytes {data[e.start:e.end]!r}); "
        f"convert it to UTF-8 (iconv -f latin1 -t utf-8), or in training name its encoding "
        f"(--config.data.encoding=latin-1) or replace what does not decode (--config.data.errors=replace).") from None
  except LookupError as e:
    raise ValueError(f"Reading {path}: {e} (data.encoding={encoding!r}, data.errors={errors!r}).") from None


def read_text_files(paths: Sequence[str] | str, patterns: Sequence[str] = DEFAULT_PATTERNS, *,
                    encoding: str = DEFAULT_ENCODING, errors: str = DEFAULT_ERRORS) -> list[str]:
  """One document per file (see `list_text_files` and `read_text_file`)."""
  return [read_text_file(name, encoding, errors) for name in list_text_files(paths, patterns)]


def tfds_documents(name: str, split: str, *, text_key: str = "text", data_dir: str | None = None,
                   max_documents: int | None = None) -> list[str]:
  """Documents of a prepared tfds dataset (e.g. "pg19"); needs `tensorflow_datasets` and its data.

  Never downloads: the dataset must already be prepared in `data_dir` (or tfds' default directory).
  """
  if data_dir is not None and not os.path.exists(data_dir):
    raise FileNotFoundError(f"tfds data_dir does not exist: {data_dir}")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"Reading tfds dataset {name!r} needs the optional `tensorflow_datasets` "
                      "package: pip install 'bmojo_jax[tfds]'.") from e
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    ds = builder.as_data_source(split=split)
  except Exception as e:  # tfds raises several types when data is absent.
    raise FileNotFoundError(f"tfds dataset {name!r} split {split!r} is not prepared in "
                            f"{data_dir or 'the default tfds data_dir'}: {e}") from e
  count = len(ds) if max_documents is None else min(max_documents, len(ds))
  documents = []
  for i in range(count):
    text = ds[i][text_key]
    documents.append(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)
  return documents


class PackedTextSource:
  """Grain random-access source over a packed token stream; see the module docstring.

  Attributes:
    tokens: int32[n] the concatenated BOS + document + EOS stream.
    doc_starts: int64[D] offset of each document in `tokens`.
    seq_len: T.
    pad_id: token used for padding the last sequence.
  """

  def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, *, seq_len: int, pad_id: int):
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got seq_len={seq_len}.")
    if tokens.ndim != 1 or tokens.size < 2:
      raise ValueError(f"packed tokens must be 1-D with >= 2 tokens, got shape {tokens.shape}.")
    if doc_starts.size == 0 or doc_starts[0] != 0:
      raise ValueError(f"doc_starts must start at 0, got {doc_starts[:4]}.")
    self.tokens = tokens.astype(np.int32, copy=False)
    self.doc_starts = doc_starts.astype(np.int64, copy=False)
    self.seq_len = int(seq_len)
    self.pad_id = int(pad_id)

  def __len__(self) -> int:
    # Sequence j needs stream[jT] as input and at least stream[jT+1] as a target.
    return (self.tokens.size - 2) // self.seq_len + 1

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"PackedTextSource index {index} out of range [0, {len(self)}).")
    t = self.seq_len
    start = index * t
    stop = min(start + t + 1, self.tokens.size)
    window = self.tokens[start:stop]
    doc = np.searchsorted(self.doc_starts, np.arange(start, stop), side="right") - 1
    pos = np.arange(start, stop) - self.doc_starts[doc]
    n = window.size - 1  # real inputs in this sequence (< T only for the last one)

    inputs = np.full((t,), self.pad_id, np.int32)
    targets = np.full((t,), IGNORE_INDEX, np.int32)
    segment_ids = np.zeros((t,), np.int32)
    positions = np.zeros((t,), np.int32)
    inputs[:n] = window[:n]
    same_doc = doc[1:] == doc[:-1]
    targets[:n] = np.where(same_doc, window[1:], IGNORE_INDEX)
    segment_ids[:n] = doc[:n] - doc[0] + 1
    positions[:n] = pos[:n]
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": positions}

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.size)

  def save(self, path: str) -> None:
    """Writes the packed stream to `path` (.npz) so it can be reloaded without re-tokenizing."""
    np.savez(path, tokens=self.tokens, doc_starts=self.doc_starts,
             seq_len=np.int64(self.seq_len), pad_id=np.int64(self.pad_id))

  @classmethod
  def load(cls, path: str) -> "PackedTextSource":
    if not os.path.exists(path):
      raise FileNotFoundError(f"Packed text file does not exist: {path}")
    with np.load(path) as f:
      return cls(f["tokens"], f["doc_starts"], seq_len=int(f["seq_len"]), pad_id=int(f["pad_id"]))


def pack_documents(documents: Iterable[str], tokenizer: Tokenizer, seq_len: int) -> PackedTextSource:
  """Tokenizes documents as BOS + ids + EOS, concatenates them, and returns the packed source."""
  encode_array = getattr(tokenizer, "encode_array", None)
  bos, eos = np.int32([tokenizer.bos_id]), np.int32([tokenizer.eos_id])
  pieces, starts, offset = [], [], 0
  for text in documents:
    body = encode_array(text) if encode_array else np.asarray(tokenizer.encode(text), np.int32)
    ids = np.concatenate([bos, body.astype(np.int32, copy=False), eos])
    starts.append(offset)
    pieces.append(ids)
    offset += ids.size
  if not pieces:
    raise ValueError("pack_documents got no documents.")
  return PackedTextSource(np.concatenate(pieces), np.asarray(starts, np.int64), seq_len=seq_len,
                          pad_id=tokenizer.pad_id)


def make_text_source(paths: Sequence[str] | str, seq_len: int, tokenizer: Tokenizer | None = None,
                     patterns: Sequence[str] = DEFAULT_PATTERNS, *, encoding: str = DEFAULT_ENCODING,
                     errors: str = DEFAULT_ERRORS) -> PackedTextSource:
  """Local files/directories → packed source (byte tokenizer unless one is given)."""
  # Raises FileNotFoundError / EmptyTextError / TextDecodeError naming the file before any work.
  documents = read_text_files(paths, patterns, encoding=encoding, errors=errors)
  return pack_documents(documents, tokenizer or ByteTokenizer(), seq_len)
