"""One language-model skeleton for all five families: embed -> blocks -> RMSNorm -> logits.

A block holds two pre-norm residual sublayers named by `cfg.sublayers`:

    s = mixer_1(norm_1(x));  h = x + s;  out = h + mixer_2(norm_2(h) [, fading source norm_2(s)])

The fading source is passed only to a memory attention that follows a Mamba mixer (B'MOJO-F, B'MOJO): its
fading tokens are read out of that mixer's output s, i.e. out of the SSM state.

`LanguageModel.__call__` is the parallel (training) pass; `prefill` runs the same pass and returns the decode
cache; `step` decodes one token from the cache. See `bmojo_jax.inference` for sampling and generation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bmojo_jax import typing as tp
from bmojo_jax.attention import Attention, AttnState
from bmojo_jax.config import ModelConfig
from bmojo_jax.layers import RMSNorm, SwiGLU, param
from bmojo_jax.mamba import Mamba, MambaState

BlockCache = tuple[Any, Any]  # (state of sublayer 1, state of sublayer 2); None for an MLP


def _make_mixer(kind: str, cfg: ModelConfig, rngs: nnx.Rngs):
  return {"attention": Attention, "mamba": Mamba, "mlp": SwiGLU}[kind](cfg, rngs=rngs)


class Block(nnx.Module):
  """Two pre-norm residual sublayers; which ones is the family's choice (`cfg.sublayers`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.kinds = cfg.sublayers
    self.norm1 = RMSNorm(cfg, rngs=rngs)
    self.mixer1 = _make_mixer(self.kinds[0], cfg, rngs)
    self.norm2 = RMSNorm(cfg, rngs=rngs)
    self.mixer2 = _make_mixer(self.kinds[1], cfg, rngs)

  def _sublayer(self, kind: str, mixer, x, fading, state, cache_size, decode: bool):
    if kind == "mlp":
      return mixer(x), None
    if kind == "mamba":
      return mixer(x, state)
    if decode:
      return mixer.step(x, fading, state)
    return mixer(x, fading, cache_size=cache_size)

  def __call__(self, x: jax.Array, cache: BlockCache | None = None, *, cache_size: int | None = None,
               decode: bool = False) -> tuple[jax.Array, BlockCache]:
    """x [B, T, D] -> (out [B, T, D], cache). decode: one token from `cache`; else the parallel pass."""
    state1, state2 = cache if cache is not None else (None, None)
    s, state1 = self._sublayer(self.kinds[0], self.mixer1, self.norm1(x), None, state1, cache_size, decode)
    h = x + s
    fading = self.norm2(s) if (self.kinds == ("mamba", "attention") and self.cfg.fading) else None
    y, state2 = self._sublayer(self.kinds[1], self.mixer2, self.norm2(h), fading, state2, cache_size, decode)
    return h + y, (state1, state2)


class LanguageModel(nnx.Module):
  """tokens [B, T] int -> logits [B, T, V] fp32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                       (tp.VOCAB, tp.EMBED), cfg.weight_dtype)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_blocks)])
    self.final_norm = RMSNorm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                           (tp.EMBED, tp.VOCAB), cfg.weight_dtype)

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    if self.cfg.tie_embeddings:
      return jnp.einsum("BTD,VD->BTV", x, self.embed[...].astype(x.dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", x, self.lm_head[...].astype(x.dtype), preferred_element_type=jnp.float32)

  def _run(self, tokens, caches, cache_size, decode):
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.cfg.compute_dtype)   # [B, T, D]
    new_caches = []
    for i, block in enumerate(self.blocks):
      cache = caches[i] if caches is not None else None
      if self.cfg.remat and not decode:
        x, cache = nnx.remat(lambda blk, y, c: blk(y, c, cache_size=cache_size))(block, x, cache)
      else:
        x, cache = block(x, cache, cache_size=cache_size, decode=decode)
      new_caches.append(cache)
    return self._logits(x), new_caches

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Parallel forward pass. tokens [B, T] -> logits [B, T, V] fp32."""
    return self._run(tokens, None, None, False)[0]

  def prefill(self, tokens: jax.Array, max_len: int | None = None) -> tuple[jax.Array, list[BlockCache]]:
    """Parallel pass over the prompt that also returns the decode cache.

    max_len bounds prompt + generated tokens; only full attention (the Transformer) needs it, to size its KV
    cache. Returns (logits [B, T, V], cache).
    """
    return self._run(tokens, None, self.cache_size(tokens.shape[1], max_len), False)

  def step(self, token: jax.Array, cache: list[BlockCache]) -> tuple[jax.Array, list[BlockCache]]:
    """Decode one token per row. token [B] -> (logits [B, V], cache)."""
    logits, cache = self._run(token[:, None], cache, None, True)
    return logits[:, 0], cache

  def cache_size(self, prompt_len: int, max_len: int | None) -> int | None:
    """Ring slots of the attention cache: the window, or max_len for full attention."""
    if not self.cfg.has_attention:
      return None
    if self.cfg.window is not None:
      return self.cfg.window
    if max_len is None or max_len < prompt_len:
      raise ValueError(f"full attention needs max_len >= the prompt length ({prompt_len}) to size its "
                       f"KV cache; got max_len={max_len}")
    return max_len

  def init_cache(self, batch: int, max_len: int | None = None) -> list[BlockCache]:
    """The cache before any token (what `prefill` of an empty prompt would return)."""
    size = self.cache_size(0, max_len)
    def init(kind, mixer):
      if kind == "mamba":
        return mixer.init_state(batch)
      return mixer.init_state(batch, size) if kind == "attention" else None
    return [(init(b.kinds[0], b.mixer1), init(b.kinds[1], b.mixer2)) for b in self.blocks]


__all__ = ["Block", "LanguageModel", "MambaState", "AttnState"]
