"""A pre-tokenized token stream on disk, opened memory-mapped, read as packed sequences.

A stream is a directory written by `bmojo-prepare` (bmojo_jax.train.data.prepare; or `StreamWriter`):
    tokens.bin        uint16[n] (vocab_size <= 65536) or uint32[n], raw little-endian: every document as
                      BOS + ids + EOS, concatenated
    doc_offsets.npy   int64[D] start of each document in tokens.bin (the first is 0), opened with mmap_mode="r"
    meta.json         {"format", "version", "dtype", "num_tokens", "num_documents", "tokenizer": the
                      tokenizer's description (`tokenizers.describe`), "source"}; written last, so a directory
                      without it is not a finished stream

`PackedStreamSource` reads it as the same examples as `packing.PackedTextSource` (int32[T] inputs, targets,
segment_ids, positions; windows of T+1 tokens with stride T), touching only the pages of the window asked for:
memory does not grow with the corpus. `StreamDocuments` reads it as documents (`bmojo-eval --lm_stream`).
"""

import json
import os
from typing import Any

import numpy as np

from bmojo_jax.train import files
from bmojo_jax.train.data import packing
from bmojo_jax.train.data import tokenizers

FORMAT = "bmojo-token-stream"
VERSION = 1
META, TOKENS, OFFSETS = "meta.json", "tokens.bin", "doc_offsets.npy"
PREPARE_HINT = ("bmojo-prepare --out {dir} --tokenizer <byte|file.model> "
                "(--text PATHS | --corpus DIR | --array-record PATHS | --tfds NAME)")


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits (vocab_size <= 65536), else uint32."""
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class StreamWriter:
  """Writes a stream directory with bounded memory: `add(tokens, doc_lengths)` appends whole documents
  (tokens already BOS + ids + EOS), `close(tokenizer_description, source)` writes doc_offsets.npy and meta.json.

  Document lengths go to a side file while writing, so memory stays O(one chunk) however large the stream.
  """

  def __init__(self, directory: str, vocab_size: int):
    self.directory = directory
    self.vocab_size = int(vocab_size)
    self.dtype = token_dtype(vocab_size)
    os.makedirs(directory, exist_ok=True)
    for name in (META, OFFSETS):   # an unfinished or older stream here is replaced
      if os.path.exists(os.path.join(directory, name)):
        os.remove(os.path.join(directory, name))
    self._tokens = files.open_nofollow(files.inside(directory, TOKENS), "wb")   # never through a planted link
    self._lengths_path = files.inside(directory, "doc_lengths.tmp")
    self._lengths = files.open_nofollow(self._lengths_path, "wb")
    self.num_tokens = 0
    self.num_documents = 0

  def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
    """tokens: int[n] (any integer dtype) of whole documents; doc_lengths: int[k], summing to n."""
    tokens = np.asarray(tokens)
    doc_lengths = np.asarray(doc_lengths, np.int64)
    if int(doc_lengths.sum()) != tokens.size:
      raise ValueError(f"doc_lengths sum to {int(doc_lengths.sum())} but {tokens.size} tokens were given.")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
      raise ValueError(f"token ids in [{int(tokens.min())}, {int(tokens.max())}] fall outside the "
                       f"vocabulary [0, {self.vocab_size}).")
    self._tokens.write(tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
    self._lengths.write(doc_lengths.astype("<i8").tobytes())
    self.num_tokens += tokens.size
    self.num_documents += doc_lengths.size

  def close(self, tokenizer_description: dict[str, Any], source: str, **extra: Any) -> dict[str, Any]:
    self._tokens.close()
    self._lengths.close()
    if self.num_documents == 0:
      raise ValueError(f"No documents were written to {self.directory}.")
    lengths = np.memmap(self._lengths_path, dtype="<i8", mode="r")
    offsets = np.lib.format.open_memmap(files.inside(self.directory, OFFSETS), mode="w+", dtype=np.int64,
                                        shape=(self.num_documents,))
    start, chunk = 0, 1 << 22
    for i in range(0, self.num_documents, chunk):  # exclusive cumulative sum, a chunk at a time
      part = np.asarray(lengths[i:i + chunk])
      ends = np.cumsum(part) + start
      offsets[i:i + part.size] = ends - part
      start = int(ends[-1])
    offsets.flush()
    del offsets, lengths
    os.remove(self._lengths_path)
    meta = {"format": FORMAT, "version": VERSION, "dtype": self.dtype.name, "num_tokens": self.num_tokens,
            "num_documents": self.num_documents, "tokenizer": tokenizer_description, "source": source, **extra}
    files.write_json(os.path.join(self.directory, META), meta, indent=1)   # last: without meta.json, no stream
    return meta


def read_meta(directory: str) -> dict[str, Any]:
  """meta.json of a finished stream, checked; FileNotFoundError naming the prepare command when absent,
  ValueError when corrupt or inconsistent with the files."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Token stream directory does not exist: {directory}. Prepare it with "
                            f"`{PREPARE_HINT.format(dir=directory)}`.")
  path = os.path.join(directory, META)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} holds no finished token stream ({META} missing; an interrupted "
                            f"prepare resumes when rerun): `{PREPARE_HINT.format(dir=directory)}`.")
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
    if meta.get("version") != VERSION:
      raise ValueError(f"version {meta.get('version')!r}; this code reads version {VERSION}")
    dtype = np.dtype(meta["dtype"])
    num_tokens, num_documents = int(meta["num_tokens"]), int(meta["num_documents"])
    int(meta["tokenizer"]["vocab_size"]), int(meta["tokenizer"]["pad_id"])
    missing = [k for k in tokenizers.KEYS if k not in meta["tokenizer"]]
    if missing:
      raise ValueError(f"its tokenizer description lacks {missing}")
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"Corrupt token stream metadata {path}: {e}. Prepare the stream again: "
                     f"`{PREPARE_HINT.format(dir=directory)}`.") from None
  tokens = os.path.join(directory, TOKENS)
  size = os.path.getsize(tokens) if os.path.exists(tokens) else -1
  if size != num_tokens * dtype.itemsize:
    raise ValueError(f"{tokens} has {size} bytes but {META} says {num_tokens} {dtype.name} tokens "
                     f"({num_tokens * dtype.itemsize} bytes); prepare the stream again.")
  if num_tokens < 2 or num_documents < 1:
    raise ValueError(f"The token stream in {directory} is too small: {num_tokens} tokens, {num_documents} docs.")
  return meta


def check_offsets(starts: np.ndarray, num_tokens: int, path: str, chunk: int = 1 << 22) -> None:
  """ValueError unless the document starts `starts` strictly increase and stay below `num_tokens` (every
  document holds at least BOS and EOS); read a chunk at a time, so memory stays bounded."""
  previous = -1
  for i in range(0, starts.size, chunk):
    part = np.asarray(starts[i:i + chunk])
    steps = np.diff(part, prepend=previous)
    if (steps <= 0).any():
      j = i + int(np.argmax(steps <= 0))
      raise ValueError(f"{path} is corrupt: document {j} starts at {int(starts[j])}, not after document {j - 1} "
                       f"({int(starts[j - 1])}); prepare the stream again.")
    previous = int(part[-1])
  if previous >= num_tokens:
    raise ValueError(f"{path} is corrupt: its last document starts at {previous}, past the {num_tokens} tokens "
                     "of the stream; prepare the stream again.")


def open_stream(directory: str, meta: dict, check: bool = True) -> tuple[np.memmap, np.ndarray]:
  """(tokens.bin as a little-endian memory map, the document starts memory-mapped) of a stream directory whose
  meta.json says `meta`. Missing or corrupt starts, starts that are not meta's documents or a stream of no
  documents are refused in one line naming the file; with `check`, also starts past the tokens or out of order."""
  num_tokens = int(meta["num_tokens"])
  tokens = np.memmap(os.path.join(directory, TOKENS), mode="r", shape=(num_tokens,),
                     dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
  path = os.path.join(directory, OFFSETS)
  try:
    starts = np.load(path, mmap_mode="r")
  except (OSError, ValueError) as e:
    raise ValueError(f"Corrupt or missing {OFFSETS} in {directory}: {e}; prepare the stream again.") from None
  if not starts.size:
    raise ValueError(f"{path} holds no documents; prepare the stream again from a corpus that has some.")
  if starts.shape != (int(meta["num_documents"]),) or starts[0] != 0:
    raise ValueError(f"{path} has shape {starts.shape} (first {starts[:1]}) but {META} says "
                     f"{meta['num_documents']} documents starting at 0; prepare the stream again.")
  if check:
    check_offsets(starts, num_tokens, path)
  return tokens, starts


class PackedStreamSource:
  """Grain random-access source of packed sequences over a stream directory (memory-mapped).

  Example j (T = seq_len) is `packing.window_example` of stream[jT : jT+T+1], exactly as
  `packing.PackedTextSource` over the same documents.
  Each read touches T+1 tokens and the few document offsets inside the window (binary search), so reading
  costs O(T log D). The window is read with os.pread (a copy of T+1 tokens), not through the map: pages a
  process has touched through a map count in its resident set until unmapped, and the kernel maps whole
  page-cache folios around each fault, so reading through `tokens` would climb to the file's size in RSS
  within a few thousand random reads (measured: 1 GB after 4,000 reads of a 1 GB stream); with pread the
  file stays in the page cache, outside the process. `tokens` stays an np.memmap for inspection. Pickles
  (for grain worker processes) as its directory and reopens the maps and the file there.

  Attributes:
    tokens: np.memmap uint16/uint32[n]; doc_starts: np.memmap int64[D]; seq_len; pad_id; vocab_size; meta.
  """

  def __init__(self, directory: str, seq_len: int, tokenizer=None):
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got seq_len={seq_len}.")
    self.directory = directory
    self.meta = read_meta(directory)
    if tokenizer is not None:
      recorded = self.meta["tokenizer"]
      tokenizers.check(recorded, tokenizer, f"The token stream in {directory} was prepared with another tokenizer "
                       "than data.tokenizer", f"Set --config.data.tokenizer to the stream's tokenizer "
                       f"({recorded.get('model_file') or recorded['kind']}) or prepare the stream again: "
                       f"{PREPARE_HINT.format(dir=directory)}.")
    self.seq_len = int(seq_len)
    self.pad_id = int(self.meta["tokenizer"]["pad_id"])
    self.vocab_size = int(self.meta["tokenizer"]["vocab_size"])
    self._open()

  def _open(self) -> None:
    self.tokens, self.doc_starts = open_stream(self.directory, self.meta,
                                               check=not getattr(self, "_offsets_checked", False))
    self._offsets_checked = True                         # once, not in every grain worker that reopens it
    self._dtype = self.tokens.dtype
    self._fd = os.open(os.path.join(self.directory, TOKENS), os.O_RDONLY)

  def __del__(self, _close=os.close):   # os.close bound now: at interpreter exit `os` may be gone
    if getattr(self, "_fd", None) is not None:
      _close(self._fd)
      self._fd = None

  def __getstate__(self):
    state = dict(self.__dict__)
    for name in ("tokens", "doc_starts", "_fd"):
      del state[name]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.size)

  def __len__(self) -> int:
    return packing.num_sequences(self.tokens.size, self.seq_len)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"PackedStreamSource index {index} out of range [0, {len(self)}).")
    t = self.seq_len
    start = index * t
    stop = min(start + t + 1, self.tokens.size)
    size = self._dtype.itemsize
    window = np.frombuffer(os.pread(self._fd, (stop - start) * size, start * size), self._dtype).astype(np.int32)
    if int(window.max()) >= self.vocab_size:
      raise ValueError(f"Token stream {self.directory} holds id {int(window.max())} >= vocab_size "
                       f"{self.vocab_size} near token {start}; the stream is corrupt, prepare it again.")
    return packing.window_example(window, self.doc_starts, start, t, self.pad_id)


class StreamDocuments:
  """The documents of a stream directory as token ids, their BOS and EOS removed: `len(docs)` documents,
  `docs[i]` -> uint16/uint32[n_i], a view of the memory map (read when used), `docs.sizes` int64[D] the n_i.

  The directory is checked as `PackedStreamSource` checks it (meta.json, tokens.bin's size, the document starts).
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.meta = read_meta(directory)
    self.tokens, starts = open_stream(directory, self.meta)
    self.starts = np.asarray(starts, np.int64)
    self.sizes = np.maximum(np.diff(self.starts, append=self.tokens.size) - 2, 0)   # each: BOS + ids + EOS

  def __len__(self) -> int:
    return int(self.starts.size)

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __getitem__(self, index: int) -> np.ndarray:
    start = int(self.starts[index])
    return self.tokens[start + 1:start + 1 + int(self.sizes[index])]
