"""Tokenize and pack documents on the fly as grain transforms: any document source -> packed batches.

    documents (random access, `sources.py`) -> shard per host -> shuffle (per epoch) -> repeat
      -> Tokenize (grain MapTransform)                 {inputs, targets, positions}: int32[n_doc]
      -> grain.experimental.ConcatThenSplitIterDataset  concatenate, split every T tokens
      -> FinishPacked (grain MapTransform)             the example format of text.PackedTextSource
      -> batch -> (worker processes: mp_prefetch)

Packing uses grain's ConcatThenSplitIterDataset, which concatenates the documents and splits the stream
every T tokens (`split_full_length_features=True`: no element is passed through whole), and checkpoints as
its parent's state plus a slice. Two details of its output differ from ours, so each document carries its
own fields for them and FinishPacked picks them:
  * its `*_positions` restart at 0 in the piece of a document that continues from the previous sequence;
    ours continue (the position within the document), so Tokenize adds a `positions` feature = arange(n);
  * it pads with 0; ours pads inputs with PAD and targets with -100 (where its segment id is 0).
Its `inputs_segment_ids` (1, 2, ... per document piece in the sequence, 0 on padding) are ours as they are.

Each document is BOS + ids + EOS; its targets are the next token within the document and -100 after EOS.
Concatenated, this is exactly `text.PackedTextSource` over the same documents in the same order (sequence
j holds stream[jT : jT+T]), except at the very end of a finite pass: there the last EOS is an input (target
-100), where PackedTextSource stops before it. Training repeats forever, so it has no end.

`OnTheFlySource` is what `tasks.make_task` puts in Task.train_source: `pipeline.make_train_iterator` sees
its `train_iterator` method and builds this pipeline instead of indexing it. Its `len` is the number of
documents (the number of sequences is only known after tokenizing everything).
"""

import grain
import numpy as np

from train.data.text import IGNORE_INDEX

_FIELDS = ("inputs", "targets", "positions")


def encode_document(tokenizer, document: str) -> np.ndarray:
  """int32[n+2]: BOS + ids + EOS."""
  encode_array = getattr(tokenizer, "encode_array", None)
  body = encode_array(document) if encode_array else np.asarray(tokenizer.encode(document), np.int32)
  out = np.empty(body.size + 2, np.int32)
  out[0], out[1:-1], out[-1] = tokenizer.bos_id, body, tokenizer.eos_id
  return out


class Tokenize(grain.transforms.Map):
  """str -> {"inputs": int32[n], "targets": int32[n], "positions": int32[n]} for one document (n = ids + 2).

  Pickles into grain's worker processes with its tokenizer (a SentencePiece one as its model file's path).
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def map(self, document: str) -> dict[str, np.ndarray]:
    ids = encode_document(self.tokenizer, document)
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


def pack_iter_dataset(documents: grain.MapDataset, tokenizer, seq_len: int, pad_id: int, *,
                      read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """MapDataset of str -> IterDataset of packed examples {inputs, targets, segment_ids, positions}: int32[T]."""
  ds = documents.map(Tokenize(tokenizer))
  it = ds.to_iter_dataset(read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
  it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={k: int(seq_len) for k in _FIELDS})
  return it.map(FinishPacked(pad_id))


def pack_in_order(documents, tokenizer, seq_len: int) -> list[dict[str, np.ndarray]]:
  """Every packed example of `documents` in order (one pass; small sources: eval sets and tests)."""
  ds = grain.MapDataset.source(documents)
  return list(pack_iter_dataset(ds, tokenizer, seq_len, tokenizer.pad_id))


class OnTheFlySource:
  """Training source that tokenizes and packs `documents` on the fly (see the module docstring).

  Attributes: documents (random access, str), tokenizer, seq_len, pad_id. `len()` counts documents.
  """

  def __init__(self, documents, tokenizer, seq_len: int):
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got seq_len={seq_len}.")
    if len(documents) == 0:
      raise ValueError(f"No documents in {getattr(documents, 'describe', lambda: documents)()}.")
    self.documents, self.tokenizer, self.seq_len = documents, tokenizer, int(seq_len)
    self.pad_id = int(tokenizer.pad_id)

  def __len__(self) -> int:
    return len(self.documents)

  def train_iterator(self, *, batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                     shard_index: int = 0, shard_count: int = 1, worker_count: int = 0, num_threads: int = 2,
                     prefetch_batches: int = 4) -> grain.DatasetIterator:
    """Checkpointable iterator of batches {name: int32[B, T]}; arguments as `pipeline.make_train_iterator`.

    Shards are by document (document i goes to shard i % shard_count; the last len % shard_count are left
    out), so hosts read disjoint documents. With worker_count > 0 each grain worker process tokenizes and
    packs its own slice of the shard.
    """
    per_shard = len(self.documents) // shard_count
    if per_shard < 1:
      raise ValueError(f"{len(self.documents)} documents cannot be split into {shard_count} shards.")
    ds = grain.MapDataset.source(self.documents)
    ds = ds[:per_shard * shard_count][shard_index::shard_count]
    if shuffle:
      ds = ds.seed(seed).shuffle()
    ds = ds.repeat(num_epochs)
    # documents read ahead: at least one per sequence of the next `prefetch_batches` batches
    options = grain.ReadOptions(num_threads=max(1, num_threads),
                                prefetch_buffer_size=max(1, prefetch_batches) * batch_size)
    it = pack_iter_dataset(ds, self.tokenizer, self.seq_len, self.pad_id, read_options=options)
    it = it.batch(batch_size, drop_remainder=True)
    it = _TupleSlices(it)
    if worker_count > 0:
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it)
