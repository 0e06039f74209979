"""Inference: sampling, a compiled decoder over a constant-size cache, and `generate`.

Prefill runs the parallel pass and hands its final states to the step path (`LanguageModel.prefill`);
`Decoder.step` is compiled once and reused for every token, with the cache donated; `Decoder.decode` runs the
same step in a `lax.scan` on device, so no Python dispatch sits between tokens. Prompts of different lengths are
batched exactly: the common prefix is prefilled, then each row is teacher-forced through the rest of its prompt
while rows past their prompt sample, all in the same scanned step.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmojo_jax.model import LanguageModel, check_cache_room


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
  """logits [B, V] -> tokens [B] int32. temperature 0 is greedy; top_k / top_p restrict the support."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> None:
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  if top_k is not None and not 0 < top_k <= vocab_size:
    raise ValueError(f"top_k={top_k} must be in 1..vocab_size={vocab_size}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")


class Decoder:
  """Compiled prefill and step functions for one model.

  `prefill(tokens [B, T], max_len, cache=None) -> (logits [B, T, V], cache)` compiles once per prompt shape
  (with a cache: continues its sequence, e.g. a second turn);
  `step(token [B], cache) -> (logits [B, V], cache)` compiles once and donates the cache;
  `decode(logits [B, V], cache, n) -> (tokens [B, n], logits, cache)` runs n steps on device in one `lax.scan`
  (sampling included) and compiles once per (B, n) and sampling settings.
  """

  def __init__(self, model: LanguageModel):
    self.cfg = model.cfg
    self.graphdef, self.state = nnx.split(model)

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def _prefill(self, state, tokens, max_len):
    return nnx.merge(self.graphdef, state).prefill(tokens, max_len)

  @functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
  def _continue(self, state, tokens, cache):
    return nnx.merge(self.graphdef, state).prefill(tokens, cache=cache)

  @functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
  def _step(self, state, token, cache):
    return nnx.merge(self.graphdef, state).step(token, cache)

  def prefill(self, tokens: jax.Array, max_len: int | None = None, cache=None):
    """(logits [B, T, V], cache) of the prompt; with `cache` (donated) it continues that sequence."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if cache is None:
      return self._prefill(self.state, tokens, max_len)
    check_cache_room(self.cfg, cache, tokens.shape[1])   # before the jitted call: the cache is concrete
    return self._continue(self.state, tokens, cache)

  def step(self, token: jax.Array, cache):
    return self._step(self.state, jnp.asarray(token, jnp.int32), cache)

  @functools.partial(jax.jit, static_argnums=(0, 7, 8, 9), donate_argnums=(3,))
  def _decode_loop(self, state, logits, cache, forced, use_forced, key, temperature, top_k, top_p):
    """Decode forced.shape[1] tokens on device (a lax.scan over the step).

    logits [B, V] predict the first position; forced, use_forced [B, n]: where use_forced, the token is the
    forced one (the rest of a prompt), else it is sampled. Returns (tokens [B, n], logits, cache).
    """
    model = nnx.merge(self.graphdef, state)

    def body(carry, xs):
      logits, cache = carry
      forced_t, use_t, key_t = xs
      token = jnp.where(use_t, forced_t, sample(logits, key_t, temperature=temperature, top_k=top_k,
                                                  top_p=top_p))
      logits, cache = model.step(token, cache)
      return (logits, cache), token

    keys = jax.random.split(key, forced.shape[1])
    (logits, cache), tokens = jax.lax.scan(body, (logits, cache), (forced.T, use_forced.T, keys))
    return tokens.T, logits, cache

  def decode(self, logits, cache, n: int, *, key=None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, forced=None, use_forced=None):
    """Sample n tokens after `logits` [B, V] on device. Where `use_forced` [B, n] is set, the token is
    `forced` [B, n] instead of a sample (the rest of a longer prompt). Returns (tokens [B, n], logits, cache)."""
    b = logits.shape[0]
    key = jax.random.key(0) if key is None else key
    forced = jnp.zeros((b, n), jnp.int32) if forced is None else jnp.asarray(forced, jnp.int32)
    use_forced = jnp.zeros((b, n), bool) if use_forced is None else jnp.asarray(use_forced, bool)
    return self._decode_loop(self.state, logits, cache, forced, use_forced, key, float(temperature), top_k, top_p)


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  lo, hi = min(min(p) for p in prompts), max(max(p) for p in prompts)
  if lo < 0 or hi >= vocab_size:
    raise ValueError(f"prompt token ids span [{lo}, {hi}] but the model's vocab_size is {vocab_size}")
  return prompts


def generate(model: LanguageModel | Decoder, prompt_tokens: Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos_id: int | None = None) -> list[list[int]]:
  """Continue each prompt by max_new_tokens tokens (cut after eos_id if given). Returns the new tokens."""
  decoder = model if isinstance(model, Decoder) else Decoder(model)
  cfg = decoder.cfg
  prompts = _check_prompts(prompt_tokens, cfg.vocab_size)
  validate_sampling(temperature, top_k, top_p, cfg.vocab_size)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  lengths = np.array([len(p) for p in prompts])
  start, total = int(lengths.min()), int(lengths.max()) + max_new_tokens
  padded = np.zeros((len(prompts), total), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p

  logits, cache = decoder.prefill(padded[:, :start], total)
  positions = np.arange(start, total)
  tokens, _, _ = decoder.decode(logits[:, -1], cache, total - start, key=jax.random.key(seed),
                                temperature=temperature, top_k=top_k, top_p=top_p, forced=padded[:, start:],
                                use_forced=positions[None, :] < lengths[:, None])
  out = np.asarray(tokens)
  results = []
  for i, n in enumerate(lengths):
    new = out[i, n - start:n - start + max_new_tokens].tolist()
    if eos_id is not None and eos_id in new:
      new = new[:new.index(eos_id) + 1]
    results.append(new)
  return results


def cache_bytes(model: LanguageModel, batch: int, context: int) -> int:
  """Bytes of the decode cache after `context` tokens (shapes only; nothing is allocated)."""
  shapes = jax.eval_shape(lambda: model.init_cache(batch, context))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
