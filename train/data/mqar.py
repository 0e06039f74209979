"""MQAR: multi-query associative recall, generated on the fly (Zoology's protocol, docs/evals.md).

Re-implemented from the protocol's description. One example of length T (= `seq_len`) with N
(= `num_kv_pairs`) key-value pairs over a vocabulary of V tokens:

    positions 0 … 2N-1     context block: key k_i at 2i, value v_i at 2i+1
    positions 2N … T-1     query region: S = (T-2N) // 2 even-offset slots; slot g has weight
                           a·(g+1)^(a-1) (normalized, a = `power_a`), so queries cluster early;
                           N distinct slots g_0 … g_{N-1} are drawn by weighted sampling without
                           replacement (in draw order) and k_i is written at 2N + 2·g_i
    everything else        0 (filler)

Keys are N distinct tokens from 1 … V//2-1, values N distinct tokens from V//2 … V-1, both uniformly
random ordered subsets, paired by index. Targets are next-token labels: -100 everywhere except at each
query key's position, whose target is its value, so every example has exactly N supervised positions.

The generator is one jnp function, `generate_batch(config, seed, indices)`, so that a training loop on an
accelerator can draw its batches on the device (`train/population.py`) and the grain source
(`MQARSource`, which calls the same function on the host CPU for one index) yields the very same
examples. Example `index` of stream `seed` is drawn from the key `fold_in(key(seed), index)` alone: any
index can be read in any order, by any process, and train/test differ only by their seeds. The choices
are ranks of random numbers (top_k, ties to the lower index), so they do not depend on the batch an
example is drawn in.
"""

import dataclasses
import functools
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from bmojo_jax.train.data.packing import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """Parameters of one MQAR task (hashable: a static argument of the jitted generator).

  Attributes:
    vocab_size: V, the model's vocabulary (Zoology default 8192). Must exceed `seq_len`.
    seq_len: T, tokens per example (inputs and targets both have T entries).
    num_kv_pairs: N, key-value pairs per example; needs 4·N <= T.
    power_a: a, the power-law exponent of the query-slot weights a·(g+1)^(a-1) (Zoology: 0.01).
  """
  vocab_size: int = 8192
  seq_len: int = 256
  num_kv_pairs: int = 16
  power_a: float = 0.01

  def __post_init__(self):
    validate_config(self)

  @property
  def num_slots(self) -> int:
    """S = (T - 2N) // 2, the even-offset query slots after the context block."""
    return (self.seq_len - 2 * self.num_kv_pairs) // 2


def validate_config(config: MQARConfig) -> None:
  """Raises ValueError naming the offending field and values."""
  v, t, n, a = config.vocab_size, config.seq_len, config.num_kv_pairs, config.power_a
  for name, value in (("vocab_size", v), ("seq_len", t), ("num_kv_pairs", n)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise ValueError(f"MQAR {name} must be an int, got {value!r}.")
  if n < 1:
    raise ValueError(f"MQAR num_kv_pairs must be >= 1, got num_kv_pairs={n}.")
  if 4 * n > t:
    raise ValueError(
        f"MQAR needs 4*num_kv_pairs <= seq_len, got num_kv_pairs={n}, seq_len={t} (4*{n}={4 * n}).")
  if v <= t:
    raise ValueError(f"MQAR needs vocab_size > seq_len, got vocab_size={v}, seq_len={t}.")
  # Redundant given the two constraints above (N <= T/4 < V/4), kept explicit for clarity.
  if n > v // 2 - 1:
    raise ValueError(
        f"MQAR needs num_kv_pairs <= vocab_size//2 - 1 distinct keys, got num_kv_pairs={n}, "
        f"vocab_size={v}.")
  if not (np.isfinite(a) and 0.0 < a <= 1.0):
    raise ValueError(f"MQAR power_a must be in (0, 1], got power_a={a}.")


def slot_probabilities(config: MQARConfig) -> np.ndarray:
  """Query-slot distribution p[g] ∝ a·(g+1)^(a-1), g = 0 … S-1. Returns float64[S]."""
  g = np.arange(1, config.num_slots + 1, dtype=np.float64)
  w = config.power_a * g ** (config.power_a - 1.0)
  return w / w.sum()


def distinct_tokens(key: jax.Array, low: int, high: int, n: int) -> jax.Array:
  """n distinct tokens of low … high-1, a uniformly random ordered subset: the indices of the n largest of
  high-low random 32-bit words (32 bits, not a float's 23, so ties are negligible). Returns int32[n]."""
  words = jax.random.bits(key, (high - low,), jnp.uint32)
  return low + jax.lax.top_k(words, n)[1]


def weighted_sample_without_replacement(key: jax.Array, probs: jax.Array, n: int) -> jax.Array:
  """Draws n distinct indices of `probs` (float[S]) one after another, each ∝ probs among those left.

  Exponential race (Efraimidis–Spirakis): index g finishes at E_g / probs[g] with E_g ~ Exp(1); the
  finishing order has exactly the law of successive weighted draws without replacement, so the first n
  finishers, in order, are the draws g_0 … g_{n-1}. Returns int32[n], in draw order.
  """
  race = jax.random.exponential(key, probs.shape, jnp.float32) / probs
  return jax.lax.top_k(-race, n)[1]   # the n smallest finishing times, earliest first


def example_from_key(config: MQARConfig, key: jax.Array) -> dict[str, jax.Array]:
  """The MQAR example of one key: {"inputs": int32[T], "targets": int32[T]}."""
  v, t, n = config.vocab_size, config.seq_len, config.num_kv_pairs
  half = v // 2
  k_keys, k_values, k_slots = jax.random.split(key, 3)
  keys = distinct_tokens(k_keys, 1, half, n)
  values = distinct_tokens(k_values, half, v, n)
  probs = jnp.asarray(slot_probabilities(config), jnp.float32)
  slots = weighted_sample_without_replacement(k_slots, probs, n)   # key i goes to the i-th drawn slot
  query_pos = 2 * n + 2 * slots
  inputs = jnp.zeros((t,), jnp.int32)
  inputs = inputs.at[0:2 * n:2].set(keys).at[1:2 * n:2].set(values).at[query_pos].set(keys)
  targets = jnp.full((t,), IGNORE_INDEX, jnp.int32).at[query_pos].set(values)
  return {"inputs": inputs, "targets": targets}


@functools.partial(jax.jit, static_argnums=0)
def generate_batch(config: MQARConfig, seed, indices) -> dict[str, jax.Array]:
  """Examples `indices` (int[B]) of stream `seed` (an int or a traced int32 scalar), on the device the
  call runs on: {"inputs": int32[B, T], "targets": int32[B, T]}. Example i uses the key
  fold_in(key(seed), i) only, so it is the same in any batch."""
  base = jax.random.key(seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.int32))
  return jax.vmap(functools.partial(example_from_key, config))(keys)


def _host_device() -> jax.Device:
  """This process's CPU (where grain reads), or its default device where JAX runs without a CPU backend."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return jax.local_devices()[0]


def generate_examples(config: MQARConfig, seed: int, indices) -> dict[str, np.ndarray]:
  """`generate_batch` run on the host CPU, as numpy: {"inputs": int32[B, T], "targets": int32[B, T]}."""
  # Arguments placed on the host run the jit there; a `jax.default_device` context would cost ~3 ms a call.
  host = _host_device()
  seed, indices = jax.device_put((np.int32(seed), np.asarray(indices, np.int32)), host)
  return jax.device_get(generate_batch(config, seed, indices))


def generate_example(config: MQARConfig, seed: int, index: int) -> dict[str, np.ndarray]:
  """Example `index` of stream `seed` on the host: {"inputs": int32[T], "targets": int32[T]}."""
  return {k: v[0] for k, v in generate_examples(config, seed, [index]).items()}


class MQARSource:
  """Grain random-access source of MQAR examples (`len`, `[index]`), deterministic per (seed, index).

  `source[i]` equals row 0 of `generate_batch(config, seed, [i])` (computed on the host CPU).

  Example:
    train = MQARSource(MQARConfig(8192, 256, 16), num_examples=100_000, seed=0)
    test = MQARSource(MQARConfig(8192, 256, 16), num_examples=3_000, seed=1)
    train[5]["inputs"].shape  # (256,)
  """

  def __init__(self, config: MQARConfig, *, num_examples: int, seed: int):
    if num_examples < 1:
      raise ValueError(f"MQARSource num_examples must be >= 1, got num_examples={num_examples}.")
    if seed < 0:
      raise ValueError(f"MQARSource seed must be >= 0, got seed={seed}.")
    self.config = config
    self.num_examples = int(num_examples)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"MQARSource index {index} out of range [0, {self.num_examples}).")
    return generate_example(self.config, self.seed, index)

  def __repr__(self) -> str:
    return f"MQARSource({self.config}, num_examples={self.num_examples}, seed={self.seed})"


def query_value_distances(example: dict[str, np.ndarray]) -> np.ndarray:
  """Distance p_q - p_v from each query key to its value in the context block. Returns int[N].

  The context block is read from the example itself: the value paired with the key at query position
  p_q sits right after that key's first occurrence.
  """
  inputs, targets = example["inputs"], example["targets"]
  query_pos = np.flatnonzero(targets != IGNORE_INDEX)
  n = query_pos.size
  context_keys = inputs[0:2 * n:2]
  order = np.argsort(context_keys)
  key_index = order[np.searchsorted(context_keys, inputs[query_pos], sorter=order)]
  value_pos = 2 * key_index + 1
  return query_pos - value_pos


# What each position of an example is, for analyses of what a model attends to or stores (the token types of
# studies/mqar_selection.py): the key and value of a pair, a query (a queried key in the query region), the
# answer slot right after a query (where its answer belongs), filler (every other 0).
TOKEN_TYPES = ("key", "value", "query", "answer_slot", "filler")


def token_types(inputs: np.ndarray, targets: np.ndarray, n: int) -> np.ndarray:
  """Index into TOKEN_TYPES of every position: int [B, T]."""
  b, t = inputs.shape
  out = np.full((b, t), TOKEN_TYPES.index("filler"))
  out[:, 0:2 * n:2], out[:, 1:2 * n:2] = TOKEN_TYPES.index("key"), TOKEN_TYPES.index("value")
  rows, query = np.nonzero(targets != IGNORE_INDEX)
  out[rows, query] = TOKEN_TYPES.index("query")
  out[rows, query + 1] = TOKEN_TYPES.index("answer_slot")   # query slots are even offsets: query + 1 < T is filler
  return out


def needed_values(inputs: np.ndarray, targets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(row, query position, value position) of every query of a batch, each [B·N]: where each query's answer
  sits (the batched form of `query_value_distances`)."""
  rows, query = np.nonzero(targets != IGNORE_INDEX)
  keys = inputs[:, 0:2 * n:2]                                                      # [B, N]
  key_index = np.argmax(keys[rows] == inputs[rows, query][:, None], axis=1)
  return rows, query, 2 * key_index + 1


def fraction_beyond_window(source_or_config: Union[MQARSource, MQARConfig], window: int,
                           num_examples: int = 1000, seed: int = 0) -> float:
  """Fraction of queries whose value is outside a causal window of `window` tokens.

  The window ends at (and includes) the query position p_q; the value at p_v is inside iff
  p_q - p_v < window. Reads the first `num_examples` records of a source, or of stream `seed` when given
  a config.
  """
  if window < 1:
    raise ValueError(f"window must be >= 1, got window={window}.")
  if isinstance(source_or_config, MQARConfig):
    source = MQARSource(source_or_config, num_examples=num_examples, seed=seed)
  else:
    source = source_or_config
  count = min(num_examples, len(source))
  if isinstance(source, MQARSource):   # one batched call instead of `count` single ones
    batch = generate_examples(source.config, source.seed, np.arange(count))
    examples = [{k: v[i] for k, v in batch.items()} for i in range(count)]
  else:
    examples = [source[i] for i in range(count)]
  distances = np.concatenate([query_value_distances(ex) for ex in examples])
  return float(np.mean(distances >= window))
