"""MQAR: multi-query associative recall, generated on the fly (Zoology's protocol, docs/evals.md).

Re-implemented from the protocol's description. One example of length T (= `seq_len`) with N
(= `num_kv_pairs`) key-value pairs over a vocabulary of V tokens:

    positions 0 … 2N-1     context block: key k_i at 2i, value v_i at 2i+1
    positions 2N … T-1     query region: S = (T-2N) // 2 even-offset slots; slot g has weight
                           a·(g+1)^(a-1) (normalized, a = `power_a`), so queries cluster early;
                           N distinct slots g_0 … g_{N-1} are drawn by weighted sampling without
                           replacement (in draw order) and k_i is written at 2N + 2·g_i
    everything else        0 (filler)

Keys are N distinct tokens from 1 … V//2-1, values N distinct tokens from V//2 … V-1, paired by index.
Targets are next-token labels: -100 everywhere except at each query key's position, whose target is its
value, so every example has exactly N supervised positions.

Each record is deterministic in (seed, index): its generator is `np.random.default_rng([seed, index])`,
so any index can be read in any order, by any process, and train/test differ only by their seeds.
"""

import dataclasses
from typing import Union

import numpy as np

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """Parameters of one MQAR task.

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


def weighted_sample_without_replacement(rng: np.random.Generator, probs: np.ndarray,
                                        n: int) -> np.ndarray:
  """Draws n distinct indices of `probs` (float[S]) one after another, each ∝ probs among those left.

  Exponential race (Efraimidis–Spirakis): index g finishes at E_g / probs[g] with E_g ~ Exp(1); the
  finishing order has exactly the law of successive weighted draws without replacement, so the first n
  finishers, in order, are the draws g_0 … g_{n-1}. Returns int[n], in draw order.
  """
  race = rng.standard_exponential(probs.shape[0]) / probs
  return np.argsort(race, kind="stable")[:n]


def generate_example(config: MQARConfig, rng: np.random.Generator,
                     slot_probs: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """One MQAR example drawn with `rng`.

  Args:
    config: the task.
    rng: the example's generator (MQARSource uses `np.random.default_rng([seed, index])`).
    slot_probs: `slot_probabilities(config)`, float64[S], passed in to skip recomputing it.

  Returns:
    {"inputs": int32[T], "targets": int32[T]}; targets are -100 except at the N query positions.
  """
  v, t, n = config.vocab_size, config.seq_len, config.num_kv_pairs
  half = v // 2
  keys = 1 + rng.choice(half - 1, size=n, replace=False)
  values = half + rng.choice(v - half, size=n, replace=False)
  if slot_probs is None:
    slot_probs = slot_probabilities(config)
  # Key i goes to the i-th drawn slot.
  slots = weighted_sample_without_replacement(rng, slot_probs, n)

  inputs = np.zeros((t,), np.int32)
  inputs[0:2 * n:2] = keys
  inputs[1:2 * n:2] = values
  query_pos = 2 * n + 2 * slots
  inputs[query_pos] = keys
  targets = np.full((t,), IGNORE_INDEX, np.int32)
  targets[query_pos] = values
  return {"inputs": inputs, "targets": targets}


class MQARSource:
  """Grain random-access source of MQAR examples (`len`, `[index]`), deterministic per (seed, index).

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
    self._slot_probs = slot_probabilities(config)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"MQARSource index {index} out of range [0, {self.num_examples}).")
    rng = np.random.default_rng([self.seed, index])
    return generate_example(self.config, rng, self._slot_probs)

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


def fraction_beyond_window(source_or_config: Union[MQARSource, MQARConfig], window: int,
                           num_examples: int = 1000, seed: int = 0) -> float:
  """Fraction of queries whose value is outside a causal window of `window` tokens.

  The window ends at (and includes) the query position p_q; the value at p_v is inside iff
  p_q - p_v < window. Reads the first `num_examples` records of a source, or of
  `MQARSource(config, seed=seed)` when given a config.
  """
  if window < 1:
    raise ValueError(f"window must be >= 1, got window={window}.")
  if isinstance(source_or_config, MQARConfig):
    source = MQARSource(source_or_config, num_examples=num_examples, seed=seed)
  else:
    source = source_or_config
  count = min(num_examples, len(source))
  distances = np.concatenate([query_value_distances(source[i]) for i in range(count)])
  return float(np.mean(distances >= window))
