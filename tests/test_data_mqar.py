"""MQAR generator: the protocol of docs/evals.md, checked example by example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmojo_jax.train.data import mqar

CONFIG = mqar.MQARConfig(vocab_size=8192, seq_len=256, num_kv_pairs=16)


def test_deterministic_per_seed_and_index():
  a = mqar.MQARSource(CONFIG, num_examples=10, seed=3)
  b = mqar.MQARSource(CONFIG, num_examples=10, seed=3)
  for i in (7, 0, 7, 3):  # any order, repeated reads
    np.testing.assert_array_equal(a[i]["inputs"], b[i]["inputs"])
    np.testing.assert_array_equal(a[i]["targets"], b[i]["targets"])
  assert not np.array_equal(a[0]["inputs"], a[1]["inputs"])


def test_different_seeds_differ():
  a = mqar.MQARSource(CONFIG, num_examples=4, seed=0)
  b = mqar.MQARSource(CONFIG, num_examples=4, seed=1)
  for i in range(4):
    assert not np.array_equal(a[i]["inputs"], b[i]["inputs"])


@pytest.mark.parametrize("seq_len,n", [(64, 4), (128, 8), (256, 16), (256, 64), (512, 64)])
def test_structure(seq_len, n):
  config = mqar.MQARConfig(vocab_size=8192, seq_len=seq_len, num_kv_pairs=n)
  source = mqar.MQARSource(config, num_examples=20, seed=0)
  half = config.vocab_size // 2
  for i in range(len(source)):
    ex = source[i]
    inputs, targets = ex["inputs"], ex["targets"]
    assert inputs.shape == targets.shape == (seq_len,)
    assert inputs.dtype == targets.dtype == np.int32
    keys, values = inputs[0:2 * n:2], inputs[1:2 * n:2]
    assert np.all((keys >= 1) & (keys < half))
    assert np.all((values >= half) & (values < config.vocab_size))
    assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
    # Exactly N supervised positions, at even offsets of the query region.
    query_pos = np.flatnonzero(targets != mqar.IGNORE_INDEX)
    assert query_pos.size == n
    assert np.all(query_pos >= 2 * n) and np.all((query_pos - 2 * n) % 2 == 0)
    assert np.all(query_pos < 2 * n + 2 * config.num_slots)
    # Each query is a context key and its target is that key's value.
    pair = dict(zip(keys.tolist(), values.tolist()))
    assert sorted(inputs[query_pos].tolist()) == sorted(keys.tolist())
    for p in query_pos:
      assert targets[p] == pair[int(inputs[p])]
    # Everything outside the context block and the query keys is filler 0.
    rest = np.ones(seq_len, bool)
    rest[:2 * n] = False
    rest[query_pos] = False
    assert np.all(inputs[rest] == 0)


def test_query_slots_cluster_early():
  config = mqar.MQARConfig(vocab_size=8192, seq_len=256, num_kv_pairs=16)
  source = mqar.MQARSource(config, num_examples=300, seed=0)
  slots = np.concatenate([
      (np.flatnonzero(source[i]["targets"] != mqar.IGNORE_INDEX) - 32) // 2 for i in range(300)])
  s = config.num_slots  # 112
  first_quarter = np.mean(slots < s // 4)
  last_quarter = np.mean(slots >= s - s // 4)
  # Slot weights ∝ (g+1)^-0.99: far more queries in the first quarter than in the last.
  assert first_quarter > 0.4
  assert last_quarter < 0.2
  assert first_quarter > 3 * last_quarter
  # Slot 0 carries the most weight and is picked in almost every example (N=16 of S=112).
  assert np.sum(slots == 0) / 300 > 0.8


def test_slot_probabilities():
  p = mqar.slot_probabilities(CONFIG)
  assert p.shape == (CONFIG.num_slots,)
  np.testing.assert_allclose(p.sum(), 1.0)
  assert np.all(np.diff(p) < 0)
  g = np.arange(1, CONFIG.num_slots + 1)
  w = 0.01 * g ** (0.01 - 1)
  np.testing.assert_allclose(p, w / w.sum())


def test_weighted_sampling_matches_successive_draws():
  # First two draws of the exponential race vs. the successive-draw law, on 4 slots.
  probs = jnp.array([0.4, 0.3, 0.2, 0.1])
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = np.asarray(jax.vmap(lambda k: mqar.weighted_sample_without_replacement(k, probs, 2))(keys))
  probs = np.asarray(probs, np.float64)
  assert np.all(draws[:, 0] != draws[:, 1])
  np.testing.assert_allclose(np.bincount(draws[:, 0], minlength=4) / 20000, probs, atol=0.015)
  second = sum(probs[i] * probs / (1 - probs[i]) * (np.arange(4) != i) for i in range(4))
  np.testing.assert_allclose(np.bincount(draws[:, 1], minlength=4) / 20000, second, atol=0.015)


def test_distinct_tokens_uniform():
  keys = jax.random.split(jax.random.key(1), 4000)
  draws = np.asarray(jax.vmap(lambda k: mqar.distinct_tokens(k, 10, 18, 3))(keys))   # 3 of the 8 tokens 10..17
  assert np.all((draws >= 10) & (draws < 18))
  assert all(len(set(row)) == 3 for row in draws.tolist())
  for j in range(3):  # every position is uniform over the 8 tokens
    np.testing.assert_allclose(np.bincount(draws[:, j] - 10, minlength=8) / 4000, 1 / 8, atol=0.02)


def test_device_batch_matches_source():
  # The jnp generator on the device and the grain source (the same generator on the host) agree example by
  # example, whatever the batch an example is drawn in.
  source = mqar.MQARSource(CONFIG, num_examples=100_000, seed=7)
  indices = np.array([99_999, 3, 0, 3, 51_234])
  batch = jax.device_get(mqar.generate_batch(CONFIG, 7, jnp.asarray(indices)))
  alone = jax.device_get(mqar.generate_batch(CONFIG, 7, jnp.asarray(indices[:1])))
  for row, i in enumerate(indices):
    for k in ("inputs", "targets"):
      np.testing.assert_array_equal(batch[k][row], source[i][k])
  np.testing.assert_array_equal(alone["inputs"][0], batch["inputs"][0])
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32


def test_generate_batch_traced_seed():
  # A traced seed (one stream per run of a population, under vmap) gives each stream's examples.
  indices = jnp.arange(4)
  both = jax.jit(jax.vmap(lambda s: mqar.generate_batch(CONFIG, s, indices)))(jnp.array([0, 5]))
  for r, seed in enumerate((0, 5)):
    one = mqar.generate_batch(CONFIG, seed, indices)
    np.testing.assert_array_equal(both["inputs"][r], one["inputs"])
    np.testing.assert_array_equal(both["targets"][r], one["targets"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(vocab_size=8192, seq_len=64, num_kv_pairs=17), "num_kv_pairs=17, seq_len=64"),
    (dict(vocab_size=256, seq_len=256, num_kv_pairs=16), "vocab_size=256, seq_len=256"),
    (dict(vocab_size=8192, seq_len=256, num_kv_pairs=0), "num_kv_pairs=0"),
    (dict(vocab_size=8192, seq_len=256, num_kv_pairs=16, power_a=0.0), "power_a=0.0"),
    (dict(vocab_size=8192, seq_len=256.0, num_kv_pairs=16), "seq_len"),
])
def test_validation_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mqar.MQARConfig(**kwargs)


def test_source_errors():
  with pytest.raises(ValueError, match="num_examples=0"):
    mqar.MQARSource(CONFIG, num_examples=0, seed=0)
  with pytest.raises(ValueError, match="seed=-1"):
    mqar.MQARSource(CONFIG, num_examples=1, seed=-1)
  with pytest.raises(IndexError, match="index 5"):
    mqar.MQARSource(CONFIG, num_examples=5, seed=0)[5]


def test_query_value_distances():
  ex = mqar.MQARSource(CONFIG, num_examples=1, seed=0)[0]
  d = mqar.query_value_distances(ex)
  query_pos = np.flatnonzero(ex["targets"] != mqar.IGNORE_INDEX)
  for p, dist in zip(query_pos, d):
    assert ex["inputs"][p - dist] == ex["targets"][p]  # the value sits `dist` tokens back
    assert ex["inputs"][p - dist - 1] == ex["inputs"][p]  # right after its key


@pytest.mark.parametrize("n,within", [(16, 1 / 3), (32, 0.06), (64, 0.0)])
def test_fraction_beyond_window_matches_evals(n, within):
  # docs/evals.md: L=256, window 32: about a third of queries in the window at N=16, ~6% at 32, none at 64.
  config = mqar.MQARConfig(vocab_size=8192, seq_len=256, num_kv_pairs=n)
  beyond = mqar.fraction_beyond_window(config, window=32, num_examples=300)
  assert abs((1 - beyond) - within) < 0.04


def test_fraction_beyond_window_edges():
  source = mqar.MQARSource(CONFIG, num_examples=50, seed=0)
  assert mqar.fraction_beyond_window(source, window=1, num_examples=50) == 1.0
  assert mqar.fraction_beyond_window(source, window=256, num_examples=50) == 0.0
  with pytest.raises(ValueError, match="window=0"):
    mqar.fraction_beyond_window(source, window=0)


def test_mqar_token_types_and_needed_values():
  """The reading of an example that studies/mqar_selection.py counts by: types by position, each query's value
  position."""
  mq = mqar.MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=8)
  data = mqar.generate_examples(mq, 0, np.arange(3))
  types = mqar.token_types(data["inputs"], data["targets"], 8)
  rows, query, value = mqar.needed_values(data["inputs"], data["targets"], 8)
  for r in range(3):
    example = {k: x[r] for k, x in data.items()}
    np.testing.assert_array_equal(query[rows == r] - value[rows == r], mqar.query_value_distances(example))
    np.testing.assert_array_equal(data["inputs"][r, value[rows == r]], data["targets"][r, query[rows == r]])
    names = np.array(mqar.TOKEN_TYPES)[types[r]]
    assert (names[:16:2] == "key").all() and (names[1:16:2] == "value").all()
    assert (names[query[rows == r]] == "query").all() and (names[query[rows == r] + 1] == "answer_slot").all()
    assert (data["inputs"][r][names == "filler"] == 0).all() and (names == "filler").sum() == 64 - 32
