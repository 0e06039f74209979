"""Grain pipelines: resume exactness, sharding, exact eval coverage, token-id checks, Orbax state."""

import numpy as np
import orbax.checkpoint as ocp
import pytest

from bmojo_jax.train.data import mqar
from bmojo_jax.train.data import pipeline


class IndexSource:
  """Tiny source whose example i is {"inputs": [i, i], "targets": [i, -100]}."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"inputs": np.array([i, i], np.int32), "targets": np.array([i, -100], np.int32)}


def _ids(batch):
  return batch["inputs"][:, 0].tolist()


def test_batches_have_leading_axis():
  source = mqar.MQARSource(mqar.MQARConfig(512, 64, 4), num_examples=32, seed=0)
  batch = next(pipeline.make_train_iterator(source, batch_size=8, seed=0))
  assert batch["inputs"].shape == batch["targets"].shape == (8, 64)
  assert batch["inputs"].dtype == np.int32


def test_resume_is_exact():
  source = mqar.MQARSource(mqar.MQARConfig(512, 64, 4), num_examples=40, seed=0)
  it = pipeline.make_train_iterator(source, batch_size=8, seed=7)
  for _ in range(7):  # crosses an epoch boundary (5 batches per epoch)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]
  fresh = pipeline.make_train_iterator(source, batch_size=8, seed=7)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_epochs_cover_shard_and_reshuffle():
  it = pipeline.make_train_iterator(IndexSource(12), batch_size=4, seed=0, num_epochs=3)
  ids = [_ids(b) for b in it]
  epochs = [sum(ids[3 * e:3 * e + 3], []) for e in range(3)]
  assert len(ids) == 9
  for epoch in epochs:
    assert sorted(epoch) == list(range(12))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  ordered = pipeline.make_train_iterator(IndexSource(12), batch_size=4, seed=0, shuffle=False,
                                         num_epochs=1)
  assert sum((_ids(b) for b in ordered), []) == list(range(12))


def test_seeds_change_order():
  a = _ids(next(pipeline.make_train_iterator(IndexSource(64), batch_size=16, seed=0)))
  b = _ids(next(pipeline.make_train_iterator(IndexSource(64), batch_size=16, seed=1)))
  assert a != b


def test_train_shards_are_disjoint_and_equal():
  count, n = 3, 31  # 31 % 3 == 1: one example is left out so shards are equal
  shards = []
  for index in range(count):
    it = pipeline.make_train_iterator(IndexSource(n), batch_size=5, seed=0, num_epochs=1,
                                      shard_index=index, shard_count=count)
    shards.append(sum((_ids(b) for b in it), []))
  assert all(len(s) == 10 for s in shards)
  seen = [set(s) for s in shards]
  for i in range(count):
    for j in range(i + 1, count):
      assert not seen[i] & seen[j]
  assert set().union(*seen) == set(range(30))


@pytest.mark.parametrize("n,batch_size,count", [(10, 4, 1), (10, 4, 3), (3000, 512, 2), (7, 8, 4)])
def test_eval_covers_every_example_once(n, batch_size, count):
  seen, num_batches = [], set()
  for index in range(count):
    batches = list(pipeline.make_eval_iterator(IndexSource(n), batch_size=batch_size,
                                               shard_index=index, shard_count=count))
    num_batches.add(len(batches))
    for b in batches:
      assert b["mask"].shape == (batch_size,) and b["mask"].dtype == np.bool_
      assert b["inputs"].shape == (batch_size, 2)
      seen.extend(b["inputs"][b["mask"], 0].tolist())
      assert np.all(b["targets"][~b["mask"]] == -100)  # padded rows supervise nothing
  assert sorted(seen) == list(range(n))
  assert len(num_batches) == 1  # every process runs the same number of eval steps


def test_eval_is_ordered_and_repeatable():
  source = mqar.MQARSource(mqar.MQARConfig(512, 64, 4), num_examples=10, seed=1)
  first = list(pipeline.make_eval_iterator(source, batch_size=4))
  second = list(pipeline.make_eval_iterator(source, batch_size=4))
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  np.testing.assert_array_equal(first[0]["inputs"][2], source[2]["inputs"])


def test_argument_errors():
  with pytest.raises(ValueError, match="shard_index=2, shard_count=2"):
    pipeline.make_train_iterator(IndexSource(8), batch_size=2, seed=0, shard_index=2,
                                 shard_count=2)
  with pytest.raises(ValueError, match="batch_size=9"):
    pipeline.make_train_iterator(IndexSource(8), batch_size=9, seed=0)
  with pytest.raises(ValueError, match="batch_size=0"):
    pipeline.make_eval_iterator(IndexSource(8), batch_size=0)


def test_validate_token_ids():
  ok = {"inputs": np.array([[0, 5, 9]]), "targets": np.array([[5, -100, 9]])}
  pipeline.validate_token_ids(ok, vocab_size=10)
  with pytest.raises(ValueError, match=r"'inputs'.*\[0, 10\].*vocab_size=10"):
    pipeline.validate_token_ids({"inputs": np.array([[0, 10]])}, vocab_size=10)
  with pytest.raises(ValueError, match=r"'targets'.*\[-3, 4\]"):
    pipeline.validate_token_ids({"inputs": np.array([[1]]), "targets": np.array([[-3, 4, -100]])},
                                vocab_size=10)
  source = mqar.MQARSource(mqar.MQARConfig(512, 64, 4), num_examples=8, seed=0)
  batch = next(pipeline.make_train_iterator(source, batch_size=8, seed=0))
  pipeline.validate_token_ids(batch, vocab_size=512)
  with pytest.raises(ValueError, match="vocab_size=256"):
    pipeline.validate_token_ids(batch, vocab_size=256)


def test_orbax_checkpoint_manager_round_trip(tmp_path):
  source = IndexSource(50)
  it = pipeline.make_train_iterator(source, batch_size=4, seed=3)
  for _ in range(5):
    next(it)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
    mngr.save(5, args=ocp.args.Composite(
        step=ocp.args.JsonSave({"step": 5}), data=pipeline.iterator_save_args(it)))
    mngr.wait_until_finished()
  expected = [_ids(next(it)) for _ in range(4)]

  fresh = pipeline.make_train_iterator(source, batch_size=4, seed=3)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
    assert mngr.latest_step() == 5
    restored = mngr.restore(5, args=ocp.args.Composite(
        step=ocp.args.JsonRestore(), data=pipeline.iterator_restore_args(fresh)))
  assert restored["step"] == {"step": 5}
  assert restored["data"] is fresh
  assert [_ids(next(fresh)) for _ in range(4)] == expected
