"""Documents packed into fixed-length examples: encoded once, read as windows, in memory or on the fly.

Every document is encoded as BOS + ids + EOS (`encode`); the documents are concatenated into one token stream
and read as windows of T+1 tokens with stride T, so every token after the first is a target exactly once.
Example j (`window_example`) holds
    inputs       int32[T]  stream[jT : jT+T]
    targets      int32[T]  stream[jT+1 : jT+T+1]; IGNORE_INDEX (-100) where the next token starts another
                           document (the EOS → next BOS transition) and on padding
    segment_ids  int32[T]  document index within the sequence, from 1; 0 on padding
    positions    int32[T]  position of the token within its document (BOS is 0); 0 on padding
The last example is padded with PAD. Three sources give these examples:
  * `PackedTextSource` (`pack_documents`): the stream as one numpy array, random access;
  * `stream.PackedStreamSource`: the stream prepared on disk, memory-mapped;
  * `OnTheFlySource`: documents tokenized and packed as grain transforms while training:

    documents -> (shard, shuffle, repeat: pipeline.make_train_iterator)
      -> Tokenize (grain MapTransform)                 {inputs, targets, positions}: int32[n_doc]
      -> grain.experimental.ConcatThenSplitIterDataset  concatenate, split every T tokens
      -> FinishPacked (grain MapTransform)             the example format above
      -> batch

ConcatThenSplitIterDataset concatenates the documents and splits the stream every T tokens
(`split_full_length_features=True`: no element is passed through whole), and checkpoints as its parent's state
plus a slice. Two details of its output differ from ours, so each document carries its own fields for them and
FinishPacked picks them:
  * its `*_positions` restart at 0 in the piece of a document that continues from the previous sequence;
    ours continue (the position within the document), so Tokenize adds a `positions` feature = arange(n);
  * it pads with 0; ours pads inputs with PAD and targets with -100 (where its segment id is 0).
Its `inputs_segment_ids` (1, 2, ... per document piece in the sequence, 0 on padding) are ours as they are.
Packed on the fly, the examples are exactly those of the stream over the same documents in the same order,
except at the very end of a finite pass: there the last EOS is an input (target -100), where the stream stops
before it. Training repeats forever, so it has no end.
"""

from typing import Iterable

import grain
import numpy as np

from bmojo_jax.train.data.tokenizers import Tokenizer

IGNORE_INDEX = -100
_DOCUMENT_FIELDS = ("inputs", "targets", "positions")


def encode(tokenizer: Tokenizer, document: str) -> np.ndarray:
  """int32[n+2]: BOS + ids + EOS."""
  body = tokenizer.encode_array(document)
  out = np.empty(body.size + 2, np.int32)
  out[0], out[1:-1], out[-1] = tokenizer.bos_id, body, tokenizer.eos_id
  return out


def num_sequences(num_tokens: int, seq_len: int) -> int:
  """Examples of a stream of `num_tokens`: example j needs stream[jT] as input and at least stream[jT+1]."""
  return (int(num_tokens) - 2) // int(seq_len) + 1


def window_example(window: np.ndarray, doc_starts: np.ndarray, start: int, seq_len: int,
                   pad_id: int) -> dict[str, np.ndarray]:
  """The example of window = stream[start : start + m] (int32[m], m <= T+1; see the module docstring).

  doc_starts: int64[D], the sorted offset of every document in the stream (an array or a memory map: only the
  offsets of the documents overlapping the window are read, by binary search)."""
  stop = start + window.size
  # Documents overlapping the window: the one holding `start` up to the last one starting before `stop`.
  first = int(np.searchsorted(doc_starts, start, side="right")) - 1
  last = int(np.searchsorted(doc_starts, stop, side="left"))
  starts = np.asarray(doc_starts[first:last], np.int64) - start      # window-relative, starts[0] <= 0
  offset = np.arange(window.size)
  doc = np.searchsorted(starts, offset, side="right") - 1             # 0 for the first document
  n = window.size - 1                                                 # inputs (< T only for the last example)

  inputs = np.full((seq_len,), pad_id, np.int32)
  targets = np.full((seq_len,), IGNORE_INDEX, np.int32)
  segment_ids = np.zeros((seq_len,), np.int32)
  positions = np.zeros((seq_len,), np.int32)
  inputs[:n] = window[:n]
  targets[:n] = np.where(doc[1:] == doc[:-1], window[1:], IGNORE_INDEX)
  segment_ids[:n] = doc[:n] + 1
  positions[:n] = (offset - starts[doc])[:n]
  return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "positions": positions}


class PackedTextSource:
  """Grain random-access source over a packed token stream held in memory; see the module docstring.

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
    return num_sequences(self.tokens.size, self.seq_len)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"PackedTextSource index {index} out of range [0, {len(self)}).")
    start = index * self.seq_len
    window = self.tokens[start:start + self.seq_len + 1]
    return window_example(window, self.doc_starts, start, self.seq_len, self.pad_id)

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.size)


def pack_documents(documents: Iterable[str], tokenizer: Tokenizer, seq_len: int) -> PackedTextSource:
  """Encodes documents (`encode`), concatenates them, and returns the packed source."""
  pieces, starts, offset = [], [], 0
  for text in documents:
    ids = encode(tokenizer, text)
    starts.append(offset)
    pieces.append(ids)
    offset += ids.size
  if not pieces:
    raise ValueError("pack_documents got no documents.")
  return PackedTextSource(np.concatenate(pieces), np.asarray(starts, np.int64), seq_len=seq_len,
                          pad_id=tokenizer.pad_id)


# ------------------------------------------------------------------------------------------ on the fly
class Tokenize(grain.transforms.Map):
  """str -> {"inputs": int32[n], "targets": int32[n], "positions": int32[n]} for one document (n = ids + 2).

  Pickles into grain's worker processes with its tokenizer (a SentencePiece one as its model file's path).
  """

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def map(self, document: str) -> dict[str, np.ndarray]:
    ids = encode(self.tokenizer, document)
    targets = np.empty_like(ids)
    targets[:-1], targets[-1] = ids[1:], IGNORE_INDEX
    return {"inputs": ids, "targets": targets, "positions": np.arange(ids.size, dtype=np.int32)}


class FinishPacked(grain.transforms.Map):
  """ConcatThenSplit's output -> {inputs, targets, segment_ids, positions}: int32[T] each (see module doc)."""

  def __init__(self, pad_id: int):
    self.pad_id = int(pad_id)

  def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = packed["inputs_segment_ids"].astype(np.int32, copy=False)
    pad = segment_ids == 0
    return {"inputs": np.where(pad, self.pad_id, packed["inputs"]).astype(np.int32, copy=False),
            "targets": np.where(pad, IGNORE_INDEX, packed["targets"]).astype(np.int32, copy=False),
            "segment_ids": segment_ids,
            "positions": np.where(pad, 0, packed["positions"]).astype(np.int32, copy=False)}


class _TupleSlices(grain.IterDataset):
  """Passes its parent through; on set_state turns the JSON lists of ConcatThenSplit's `remainder_slices`
  back into tuples. grain's Orbax handler stores states as JSON, and ConcatThenSplit compares a slice with
  its tuple sentinel (-1, -1): a list never equals it, so a restored iterator would think it holds a remainder
  and drop data. (grain 0.2.18.)"""

  def __iter__(self):
    return _TupleSlicesIterator(self._parent.__iter__())


def _tuple_slices(state):
  if isinstance(state, dict):
    return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _tuple_slices(v))
            for k, v in state.items()}
  if isinstance(state, list):
    return [_tuple_slices(v) for v in state]
  return state


class _TupleSlicesIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(_tuple_slices(state))


class OnTheFlySource:
  """Training documents tokenized and packed on the fly (see the module docstring); what `tasks.make_task` puts
  in Task.train_source for data.kind=array_record / tfds, and `pipeline.make_train_iterator` reads by document.

  Attributes: documents (random access, str), tokenizer, seq_len, pad_id. `len()` counts documents (the number
  of sequences is only known after tokenizing everything).
  """

  def __init__(self, documents, tokenizer: Tokenizer, seq_len: int):
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got seq_len={seq_len}.")
    if len(documents) == 0:
      raise ValueError(f"No documents in {getattr(documents, 'describe', lambda: documents)()}.")
    self.documents, self.tokenizer, self.seq_len = documents, tokenizer, int(seq_len)
    self.pad_id = int(tokenizer.pad_id)

  def __len__(self) -> int:
    return len(self.documents)

  def batches(self, documents: grain.MapDataset, batch_size: int,
              read_options: grain.ReadOptions) -> grain.IterDataset:
    """A MapDataset of str (these documents, sharded, shuffled, repeated) -> IterDataset of batches
    {inputs, targets, segment_ids, positions}: int32[B, T]; `read_options` reads documents ahead."""
    it = documents.map(Tokenize(self.tokenizer)).to_iter_dataset(read_options)
    it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={k: self.seq_len for k in _DOCUMENT_FIELDS})
    it = it.map(FinishPacked(self.pad_id)).batch(batch_size, drop_remainder=True)
    return _TupleSlices(it)
