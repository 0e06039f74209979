"""Grain pipelines the trainer uses: a checkpointable training iterator, an exact eval iterator, checks.

Both pipelines read a random-access source (`MQARSource`, `PackedTextSource`, `PackedStreamSource`, or
any object with `__len__` and `__getitem__` returning a dict of numpy arrays) and yield dicts of numpy
arrays with a leading batch axis B. A training source may also be a `packing.OnTheFlySource`: its documents
go through the same steps and are tokenized and packed (grain transforms) before the batch.

Training: shard per process → shuffle (reshuffled each epoch) → repeat → [tokenize, pack] → batch (drop
remainder).
Each shard has exactly len(source) // shard_count examples (strided: example i goes to shard
i % shard_count; the last len(source) % shard_count examples are left out), so every process runs the
same number of steps. The iterator's state is a small JSON-able dict: `it.get_state()` /
`it.set_state(state)`, or through Orbax with `iterator_save_args` / `iterator_restore_args`:

    mngr = ocp.CheckpointManager(directory)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                            data=iterator_save_args(it)))
    mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                               data=iterator_restore_args(it)))  # restores `it` in place

Each process writes its own `process_{i}-of-{n}.json` inside the `data` item.

Evaluation: one pass, no shuffle, every example exactly once over all shards. Batches always have B
rows: the last batch is padded with all-zero rows whose "targets" are -100, and every batch carries
`"mask": bool[B]` (True on real examples). Shards are padded to the same number of batches, so all
processes run the same number of eval steps. Weight per-example metrics by "mask".
"""

from typing import Any, Mapping

from absl import flags
import grain
import numpy as np

from bmojo_jax.train.data import packing
from bmojo_jax.train.data.packing import IGNORE_INDEX


def _check_sharding(shard_index: int, shard_count: int) -> None:
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"Need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
                     f"shard_count={shard_count}.")


def _read_options(num_threads: int, prefetch_batches: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, prefetch_batches))


def make_train_iterator(source, *, batch_size: int, seed: int, shuffle: bool = True,
                        num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                        worker_count: int = 0, num_threads: int = 2,
                        prefetch_batches: int = 4) -> grain.DatasetIterator:
  """Checkpointable training iterator of batches {name: [B, ...]}.

  Args:
    source: random-access source of dict examples, or a `packing.OnTheFlySource`, whose documents are sharded,
      shuffled and repeated the same way and then tokenized and packed (a shard needs one document, not B).
    batch_size: B per process (the remainder of each epoch's shard is dropped).
    seed: shuffle seed; each epoch is shuffled differently, deterministically from `seed`.
    shuffle: False reads each shard in order (for debugging).
    num_epochs: None repeats forever.
    shard_index, shard_count: this process's shard (usually jax.process_index(), process_count()).
    worker_count: 0 reads in threads of this process; > 0 uses that many grain worker processes
      (same stream and same resumable state; the source must pickle; MQAR reads ~0.1-0.2 ms per
      example per core, so large MQAR batches want workers; packed on the fly, each worker tokenizes and
      packs its own slice of the shard).
    num_threads: threads assembling batches ahead of the consumer (per worker); 0 reads on demand.
    prefetch_batches: batches read ahead (per worker).
  """
  _check_sharding(shard_index, shard_count)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}.")
  on_the_fly = isinstance(source, packing.OnTheFlySource)
  items = source.documents if on_the_fly else source
  per_shard = len(items) // shard_count
  if on_the_fly and per_shard < 1:
    raise ValueError(f"{len(items)} documents cannot be split into {shard_count} shards.")
  if not on_the_fly and per_shard < batch_size:
    raise ValueError(f"Need 1 <= batch_size <= examples per shard, got batch_size={batch_size}, "
                     f"examples per shard={per_shard} (len(source)={len(source)}, "
                     f"shard_count={shard_count}).")
  ds = grain.MapDataset.source(items)
  ds = ds[:per_shard * shard_count][shard_index::shard_count]
  if shuffle:
    ds = ds.seed(seed).shuffle()
  ds = ds.repeat(num_epochs)  # Re-seeds the shuffle each epoch.
  if on_the_fly:
    # documents read ahead: at least one per sequence of the next `prefetch_batches` batches
    it_ds = source.batches(ds, batch_size, grain.ReadOptions(
        num_threads=max(1, num_threads), prefetch_buffer_size=max(1, prefetch_batches) * batch_size))
  else:
    # Batched after repeat, so a batch may span two epochs. Whole batches are read ahead in threads:
    # grain's per-example thread prefetch is slower than one thread per batch (GIL-bound sources).
    it_ds = ds.batch(batch_size, drop_remainder=True).to_iter_dataset(_read_options(num_threads, prefetch_batches))
  if worker_count > 0:
    # Grain's worker processes read absl flags; outside absl.app.run nobody parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


class _PaddedShard:
  """Random-access view of one eval shard padded to `length` rows, adding a "mask" field."""

  def __init__(self, source, indices: np.ndarray, length: int):
    self._source = source
    self._indices = indices
    self._length = length

  def __len__(self) -> int:
    return self._length

  def _pad_example(self) -> dict[str, np.ndarray]:
    example = self._source[0]
    pad = {k: np.zeros_like(v) for k, v in example.items()}
    if "targets" in pad:
      pad["targets"] = np.full_like(example["targets"], IGNORE_INDEX)
    pad["mask"] = np.bool_(False)
    return pad

  def __getitem__(self, i: int) -> dict[str, Any]:
    if i < len(self._indices):
      example = dict(self._source[int(self._indices[i])])
      if "mask" in example:
        raise ValueError("Eval examples must not already have a 'mask' field.")
      example["mask"] = np.bool_(True)
      return example
    return self._pad_example()


def make_eval_iterator(source, *, batch_size: int, shard_index: int = 0,
                       shard_count: int = 1, num_threads: int = 2) -> grain.DatasetIterator:
  """One ordered pass over this process's shard; batches {name: [B, ...], "mask": bool[B]}.

  Shard i holds examples i, i + shard_count, …; all shards yield
  ceil(ceil(len(source) / shard_count) / B) batches, padded rows having mask False.
  """
  _check_sharding(shard_index, shard_count)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}.")
  n = len(source)
  indices = np.arange(shard_index, n, shard_count)
  max_shard = -(-n // shard_count)
  num_batches = -(-max_shard // batch_size)
  padded = _PaddedShard(source, indices, num_batches * batch_size)
  ds = grain.MapDataset.source(padded).batch(batch_size, drop_remainder=True)
  return iter(ds.to_iter_dataset(_read_options(num_threads, 4)))


def validate_token_ids(batch: Mapping[str, np.ndarray], vocab_size: int,
                       keys: tuple[str, ...] = ("inputs", "targets")) -> None:
  """Raises ValueError if token ids in `batch[keys]` fall outside [0, vocab_size).

  -100 (ignored targets) is skipped. The error names the field, its min/max id and the vocab size.
  """
  for key in keys:
    if key not in batch:
      continue
    ids = np.asarray(batch[key])
    ids = ids[ids != IGNORE_INDEX]
    if ids.size == 0:
      continue
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
      raise ValueError(f"Batch field {key!r} has token ids in [{lo}, {hi}] (ignoring "
                       f"{IGNORE_INDEX}), outside the model vocabulary [0, {vocab_size}) "
                       f"(vocab_size={vocab_size}).")


def iterator_save_args(iterator: grain.DatasetIterator):
  """Orbax args saving a grain iterator's state (an item of `ocp.args.Composite`)."""
  return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator):
  """Orbax args restoring into `iterator` in place (an item of `ocp.args.Composite`)."""
  return grain.checkpoint.CheckpointRestore(iterator)
