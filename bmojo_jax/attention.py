"""Attention: full causal, sliding window, and the B'MOJO memory attention (window + fading + eidetic).

Query t in chunk c = t // L attends to (docs/spec.md, "Memory attention")
  1. window keys t - w < t' <= t (RoPE on queries and window keys; all t' <= t when window is None);
  2. the fading tokens of chunk c: the projected mixer outputs at the last M_f positions of chunk c-1;
  3. the eidetic store as it stands at the end of chunk c-1 (keys without RoPE), filled by the tokens that
     `cfg.selection`'s score ranks highest in each chunk (`bmojo_jax.memory`).
Chunk 0 has no memory. The parallel pass projects, asks `chunk_memory` for the memory tokens of every chunk
and calls the attention function `cfg.compute.attn_impl` names (`bmojo_jax.kernels`); the decode step attends over a
ring buffer of the last w keys plus the same memory, and carries an `AttnState`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmojo_jax import typing as tp
from bmojo_jax.config import ModelConfig, Selection
from bmojo_jax.kernels import get_attention_fn
from bmojo_jax.layers import einsum_layer, param, rope
from bmojo_jax.memory import LastChunk, chunk_memory, continued_memory, fading_rows
from bmojo_jax.memory.scoring import PREDICTOR_TAPS, ScoreInputs, last_inputs, selection_scores
from bmojo_jax.memory.selection import insert_candidate
from bmojo_jax.memory.store import Store, empty_store, merge
from bmojo_jax.segments import Packing
from bmojo_jax.pallas_kernels.window_attention.reference import NEG_INF


class AttnState(NamedTuple):
  """Decode cache of one attention sublayer. Sizes: S ring slots, M_f fading, M_e store, k_e candidates."""
  k: jax.Array                  # [B, S, K, P] ring of the last S keys (RoPE applied); slot = position % S
  v: jax.Array                  # [B, S, K, P]
  fading_k: jax.Array           # [B, M_f, K, P] the current chunk's fading tokens
  fading_v: jax.Array
  next_fading_k: jax.Array      # [B, M_f, K, P] projections of the last M_f mixer outputs
  next_fading_v: jax.Array
  store: Store                  # [B, M_e, …] the eidetic store at the end of the previous chunk
  cand: Store                   # [B, k_e, …] the current chunk's selections so far
  history: jax.Array            # [B, 4, D] fp32, the innovation test's last inputs ([B, 0, D] where unread)
  pos: jax.Array                # [] int32, tokens seen


CHUNK_FIELDS = ("fading_k", "fading_v", "store", "cand")   # what `Attention.start_chunk` changes
CONTINUE_BLOCK = 256   # queries per block of a parallel continuation (`Attention._continue_parallel`)


class Attention(nnx.Module):
  """Multi-head / grouped-query attention with optional window and memory tokens."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, kh, p = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
    self.cfg = cfg
    self.wq = einsum_layer("BTD,DHP->BTHP", (d, h, p), (tp.EMBED, tp.HEADS, tp.HEAD_DIM), cfg, rngs, cfg.init_std)
    self.wk = einsum_layer("BTD,DKP->BTKP", (d, kh, p), (tp.EMBED, tp.KV_HEADS, tp.HEAD_DIM), cfg, rngs,
                           cfg.init_std)
    self.wv = einsum_layer("BTD,DKP->BTKP", (d, kh, p), (tp.EMBED, tp.KV_HEADS, tp.HEAD_DIM), cfg, rngs,
                           cfg.init_std)
    self.wo = einsum_layer("BTHP,HPD->BTD", (h, p, d), (tp.HEADS, tp.HEAD_DIM, tp.EMBED), cfg, rngs,
                           cfg.init_std / (2 * cfg.n_blocks) ** 0.5)
    if cfg.learned_selection:   # w_s [D] of `bmojo_jax.memory.scoring.learned_scores`
      self.scorer = param(rngs, nnx.initializers.normal(cfg.init_std), (d,), (tp.EMBED,), cfg.weight_dtype)
    if cfg.linear_selection:    # W [4, D, D] of `bmojo_jax.memory.scoring.linear_scores`: I/4, the innovation test
      moving_average = lambda key, shape, dtype: jnp.broadcast_to(jnp.eye(d) / PREDICTOR_TAPS, shape).astype(dtype)
      self.predictor = param(rngs, moving_average, (PREDICTOR_TAPS, d, d), (None, tp.EMBED, None), cfg.weight_dtype)

  def fading_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values of fading tokens: x [B, ..., D] read-outs of the mixer -> k, v [B, ..., K, P]. The
    parallel pass projects only the M_f read-outs per chunk that become tokens (M_f / chunk of the positions,
    1/32 in the paper presets), not all T of them."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return tuple(w(flat).reshape(*x.shape[:-1], *w.kernel.shape[1:]) for w in (self.wk, self.wv))

  def fading_parts(self, fading: jax.Array | None, fading_norm=None):
    """(source, project, fk, fv): what the fading tokens are cut from, and how the cut [B, ..., *] becomes their
    keys and values [B, ..., K, P]. Usually the source is the read-outs fading [B, T, D] and only the cut is
    normalized (fading_norm, when the read-outs come before their norm) and projected (M_f per chunk); a
    selection that scores with the projections at every position (`cfg.scores_read_fading`) gets them as fk,
    fv [B, T, K, P], and the tokens are cut from those, projected once. fk, fv are None otherwise."""
    if not self.cfg.scores_read_fading:
      if fading_norm is None:
        return fading, self.fading_kv, None, None
      return fading, lambda rows: self.fading_kv(fading_norm(rows)), None, None
    if fading_norm is not None:
      fading = fading_norm(fading)
    fk, fv = self.fading_kv(fading)
    return jnp.stack([fk, fv], axis=2), lambda x: (x[..., 0, :, :], x[..., 1, :, :]), fk, fv

  def score_inputs(self, a, k_raw, v, fk, fv, **kw) -> ScoreInputs:
    """What `selection_scores` reads of this sublayer: a [B, T, D], k_raw, v, fk, fv [B, T, K, P] (fk, fv None
    without fading tokens), the scorer's or the predictor's weights, and `ScoreInputs`' other fields from kw."""
    cfg = self.cfg
    linear = {"w_p": self.predictor[...], "predictor_loss_weight": cfg.predictor_loss_weight} \
        if cfg.linear_selection else {}
    return ScoreInputs(a, k_raw, v, fk, fv, w_s=self.scorer[...] if cfg.learned_selection else None, **linear, **kw)

  def __call__(self, a: jax.Array, state: AttnState | None = None, *, fading: jax.Array | None = None,
               fading_norm=None, cache_size: int | None = None, packing: Packing | None = None
               ) -> tuple[jax.Array, AttnState | None]:
    """Parallel pass from position 0, or with `state` a continuation of the sequence it holds.

    a [B, T, D] attention input; fading [B, T, D] fading source (the normed mixer output; B'MOJO-F /
    B'MOJO); with fading_norm, fading is the read-out before its norm and fading_norm(rows [..., D]) is applied
    to the rows cut from it only (`fading_parts`). With cache_size (ring slots; the window, or the maximum length for full attention) also
    returns the decode state after the last token. With `packing` (several documents per row) no key or
    memory token of one document is visible to another, and chunks count from each document's first token.
    A continuation (a prompt fed in pieces, a second turn) attends in parallel too: without memory tokens
    over the ring cache and the piece (`_continue_parallel`), with them through the attention function over the
    piece in memory chunks (`_continue_memory`); `_continue`, `step` over its tokens in a `lax.scan`, is the
    reference of both (tests/test_chunked_prefill.py).
    """
    if state is not None:
      if packing is not None:
        raise NotImplementedError("a continuation from a decode state takes one document per row")
      if not (self.cfg.fading or self.cfg.eidetic):
        return self._continue_parallel(a, state)
      return self._continue_memory(a, state, fading, fading_norm)
    cfg = self.cfg
    if packing is not None and cache_size is not None:
      raise NotImplementedError("a packed row has no single decode state; prefill one document per row")
    b, t, _ = a.shape
    positions = jnp.arange(t) if packing is None else packing.positions
    k_raw, v = self.wk(a), self.wv(a)
    q, k = rope(self.wq(a), positions, cfg.rope_theta), rope(k_raw, positions, cfg.rope_theta)
    source, project, fk, fv = self.fading_parts(fading, fading_norm)
    mem = chunk_memory(cfg, source, project, self.score_inputs(a, k_raw, v, fk, fv), packing)
    attend = get_attention_fn(cfg.compute.attn_impl)
    o = attend(q, k, v, mem.k, mem.v, mem.valid, window=cfg.window, chunk=cfg.chunk,
               segment_ids=None if packing is None else packing.ids, mem_span=mem.span)
    y = self.wo(o)
    if cache_size is None:
      return y, None

    state = self.init_state(b, cache_size)
    ring = lambda x: ring_cache(x, 0, t, cache_size)
    state = state._replace(k=ring(k), v=ring(v), pos=jnp.asarray(t, jnp.int32),
                           **{f: x for f, x in mem.last._asdict().items() if x is not None})
    m_f = cfg.fading
    if m_f:                                         # the read-outs of the last M_f tokens, zeros before t = 0
      pad = [(0, 0), (max(0, m_f - t), 0)] + [(0, 0)] * (source.ndim - 2)
      next_k, next_v = project(jnp.pad(source, pad)[:, -m_f:])
      state = state._replace(next_fading_k=next_k, next_fading_v=next_v)
    if self.history_len:                            # the only score that reads earlier inputs
      state = state._replace(history=last_inputs(a))
    return y, state

  def _continue(self, a: jax.Array, state: AttnState, fading: jax.Array | None):
    """`step` over the T tokens of a [B, T, D] (and fading, normed) from `state` -> (y [B, T, D], state): the
    reference of the parallel continuations (`_continue_parallel`, `_continue_memory`)."""
    def body(state, xs):
      y, state = self.step(xs[0][:, None], state, fading=None if xs[1] is None else xs[1][:, None])
      return state, y[:, 0]
    to_time = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
    state, y = jax.lax.scan(body, state, (to_time(a), to_time(fading)))
    return jnp.moveaxis(y, 0, 1), state

  def _continue_parallel(self, a: jax.Array, state: AttnState, block: int = CONTINUE_BLOCK
                         ) -> tuple[jax.Array, AttnState]:
    """`_continue` without memory tokens, all T queries at once: a [B, T, D] at positions p0 + [0, T) (p0 =
    state.pos) -> (y [B, T, D], state), what `step` gives token by token (tests/test_chunked_prefill.py).

    The keys are the ring's S slots in position order (positions p0 - S .. p0 - 1, negative ones invalid)
    followed by the piece's T: ext [B, S + T, K, P]. Queries go in blocks of `block`, each attending to the
    S + block keys before its end (its window and all the ring can hold) through `decode_attention`, so the
    logits held are [block, S + block] a head, whatever T (S: the window, or max_len for full attention).
    """
    cfg = self.cfg
    b, t, _ = a.shape
    p0, size = state.pos, state.k.shape[1]
    positions = p0 + jnp.arange(t)
    k_raw, v = self.wk(a), self.wv(a)
    q, k = rope(self.wq(a), positions, cfg.rope_theta), rope(k_raw, positions, cfg.rope_theta)
    block = min(block, t)
    n_blocks = -(-t // block)
    pad = n_blocks * block - t                      # padded keys lie after every real query: never seen
    ring_slots = jnp.mod(p0 - size + jnp.arange(size), size)                        # [S] in position order
    ext_pos = p0 - size + jnp.arange(size + t + pad)                                # [S + T + pad]
    ext = lambda ring, new: jnp.concatenate(
        [jnp.take(ring, ring_slots, axis=1), jnp.pad(new.astype(ring.dtype), [(0, 0), (0, pad), (0, 0), (0, 0)])],
        axis=1)
    ext_k, ext_v = ext(state.k, k), ext(state.v, v)
    q = jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)])

    def attend(i):                                  # queries [i·block, (i + 1)·block) of the piece
      lo = i * block
      keys, values, key_pos = (jax.lax.dynamic_slice_in_dim(x, lo, size + block, axis=ax)
                               for x, ax in ((ext_k, 1), (ext_v, 1), (ext_pos, 0)))
      query_pos = p0 + lo + jnp.arange(block)
      valid = (key_pos[None] >= 0) & (key_pos[None] <= query_pos[:, None])          # [block, S + block]
      if cfg.window is not None:
        valid &= key_pos[None] > query_pos[:, None] - cfg.window
      one = lambda qi, vi: decode_attention(qi, [(keys, values, vi[None])])
      return jax.vmap(one, in_axes=(1, 0), out_axes=1)(jax.lax.dynamic_slice_in_dim(q, lo, block, 1), valid)

    o = jax.lax.map(attend, jnp.arange(n_blocks))                                   # [n, B, block, H, P]
    o = jnp.moveaxis(o, 0, 1).reshape(b, n_blocks * block, *o.shape[3:])[:, :t]
    ring = lambda x: ring_cache(x, p0 - size, p0 + t, size)
    return self.wo(o), state._replace(k=ring(ext_k), v=ring(ext_v), pos=p0 + t)

  def _continue_memory(self, a: jax.Array, state: AttnState, fading: jax.Array, fading_norm=None
                       ) -> tuple[jax.Array, AttnState]:
    """`_continue` with memory tokens in one parallel pass: a, fading [B, T, D] (as `__call__`) at positions
    p0 + [0, T) (p0 = state.pos, any phase of the chunks) -> (y [B, T, D], state), what `step` gives token by
    token (tests/test_chunked_prefill.py).

    The memory of the chunks the piece meets comes from `continued_memory` (the state's fading tokens, store
    and candidates for the chunk it starts in, then each chunk's built as the one-pass prefill builds it). The
    attention function (`cfg.compute.attn_impl`, as in the parallel pass) runs over a frame of N = R + n·L
    positions from F = max(c0·L - R, 0) (c0 = p0 // L; R the ring's S slots rounded up to L, >= the window;
    n = ceil((T + L - 1) / L)), so the frame's chunks are the sequence's: its keys are the ring's (positions
    >= p0 - S) and the piece's, zeros elsewhere (out of every real query's window); the queries before and after
    the piece are padding, sliced off. N does not depend on p0: one compile for any phase.
    """
    cfg = self.cfg
    b, t, _ = a.shape
    chunk, m_f = cfg.chunk, cfg.fading
    state = self.enter_chunk(state)
    p0, size = state.pos, state.k.shape[1]
    positions = p0 + jnp.arange(t)
    k_raw, v = self.wk(a), self.wv(a)
    q, k = rope(self.wq(a), positions, cfg.rope_theta), rope(k_raw, positions, cfg.rope_theta)
    source, project, fk, fv = self.fading_parts(fading, fading_norm)
    before = (state.next_fading_k, state.next_fading_v) if m_f else None
    scored = self.score_inputs(a, k_raw, v, fk, fv, history=state.history if self.history_len else None,
                               prev_fk=state.next_fading_k[:, -1:] if m_f else None,
                               prev_fv=state.next_fading_v[:, -1:] if m_f else None)
    first = LastChunk(*(getattr(state, f) if getattr(cfg, need) else None for f, need in (
        ("fading_k", "fading"), ("fading_v", "fading"), ("store", "eidetic"), ("cand", "eidetic"))))
    mem = continued_memory(cfg, source, project, scored, p0, first, before)

    n = mem.k.shape[1]
    reach = -(-size // chunk) * chunk                                               # R
    frame = reach + n * chunk                                                       # N
    c0_start = p0 - p0 % chunk
    f0 = jnp.maximum(c0_start - reach, 0)                                           # F, a multiple of L
    frame_pos = f0 + jnp.arange(frame)
    in_ring = (frame_pos < p0) & (frame_pos >= p0 - size)
    in_piece = (frame_pos >= p0) & (frame_pos < p0 + t)
    src = jnp.where(in_ring, frame_pos % size, jnp.where(in_piece, size + frame_pos - p0, size + t))
    keys = lambda ring, new: jnp.take(jnp.concatenate(
        [ring, new.astype(ring.dtype), jnp.zeros_like(ring[:, :1])], axis=1), src, axis=1)   # [B, N, K, P]
    frame_k, frame_v = keys(state.k, k), keys(state.v, v)
    at = lambda x, i, length: jax.lax.dynamic_update_slice_in_dim(
        jnp.zeros((b, length, *x.shape[2:]), x.dtype), x, i, axis=1)
    frame_q = at(q, p0 - f0, frame)
    c0 = (c0_start - f0) // chunk                                                   # chunk c0 in the frame
    mem_k, mem_v, mem_valid = (at(x, c0, frame // chunk) for x in (mem.k, mem.v, mem.valid))
    attend = get_attention_fn(cfg.compute.attn_impl)
    o = attend(frame_q, frame_k, frame_v, mem_k, mem_v, mem_valid, window=cfg.window, chunk=chunk)
    o = jax.lax.dynamic_slice_in_dim(o, p0 - f0, t, axis=1)

    ring = lambda x: ring_cache(x, f0, p0 + t, size)
    state = state._replace(k=ring(frame_k), v=ring(frame_v), pos=p0 + t,
                           **{f: x for f, x in mem.last._asdict().items() if x is not None})
    if m_f:                                         # the read-outs of the piece's last M_f tokens
      next_k, next_v = fading_rows(source, project, before, t - m_f + jnp.arange(m_f))
      state = state._replace(next_fading_k=next_k, next_fading_v=next_v)
    if self.history_len:
      state = state._replace(history=last_inputs(a, state.history))
    return self.wo(o), state

  def step(self, a: jax.Array, state: AttnState, *, fading: jax.Array | None = None
           ) -> tuple[jax.Array, AttnState]:
    """One token at position state.pos. a, fading [B, 1, D] -> (y [B, 1, D], new state).

    The chunk-boundary work (`start_chunk`: the store merge, a sort over M_e + k_e entries) runs only at the
    first token of a chunk, in a `lax.cond` on the device scalar state.pos: every other token does only its own
    work (`step_select` is the branch-free form, which computes the merge at every token and selects it).
    """
    return self._token_step(a, self.enter_chunk(state), fading)

  def enter_chunk(self, state: AttnState) -> AttnState:
    """The state with the memory of the chunk holding position state.pos current: at a chunk's first token
    (after chunk 0) `start_chunk`, in a `lax.cond` on the device scalar state.pos; else the state as it is."""
    if not (self.cfg.eidetic or self.cfg.fading):
      return state
    t = state.pos
    boundary = (t % self.cfg.chunk == 0) & (t > 0)
    return state._replace(**jax.lax.cond(boundary, lambda s: self._chunk_fields(self.start_chunk(s)),
                                         self._chunk_fields, state))

  def step_select(self, a: jax.Array, state: AttnState, *, fading: jax.Array | None = None
                  ) -> tuple[jax.Array, AttnState]:
    """`step` without a conditional: the chunk-boundary work is computed at every token and selected by the
    boundary flag (the reference of `step`'s `lax.cond`; the same state and output bit for bit)."""
    t = state.pos
    if self.cfg.eidetic or self.cfg.fading:
      boundary = (t % self.cfg.chunk == 0) & (t > 0)
      new = self._chunk_fields(self.start_chunk(state))
      state = state._replace(**jax.tree.map(lambda x, y: jnp.where(boundary, x, y), new,
                                            self._chunk_fields(state)))
    return self._token_step(a, state, fading)

  @staticmethod
  def _chunk_fields(state: AttnState) -> dict:
    return {f: getattr(state, f) for f in CHUNK_FIELDS}

  def _token_step(self, a: jax.Array, state: AttnState, fading: jax.Array | None
                  ) -> tuple[jax.Array, AttnState]:
    """The work of the token at state.pos alone, the chunk's memory already current (`step`)."""
    cfg = self.cfg
    t = state.pos
    chunk, m_f, m_e = cfg.chunk, cfg.fading, cfg.eidetic

    k_raw, v, fk, fv = self.step_kv(a, fading)                                       # [B, 1, K, P]
    q, k = rope(self.wq(a), t[None], cfg.rope_theta), rope(k_raw, t[None], cfg.rope_theta)
    size = state.k.shape[1]
    slot = t % size
    ring_k = jax.lax.dynamic_update_slice_in_dim(state.k, k.astype(state.k.dtype), slot, axis=1)
    ring_v = jax.lax.dynamic_update_slice_in_dim(state.v, v.astype(state.v.dtype), slot, axis=1)
    state = state._replace(k=ring_k, v=ring_v, pos=t + 1)
    slot_pos = t - jnp.mod(t - jnp.arange(size), size)                              # [S] position per slot
    ring_valid = slot_pos >= 0
    if cfg.window is not None:
      ring_valid &= slot_pos > t - cfg.window

    parts = [(ring_k, ring_v, ring_valid[None])]                                    # (k, v, valid [B|1, S])
    if m_e:   # scored before the fading buffer moves on: its last entry is the read-out at t-1
      score, _ = selection_scores(cfg.selection, self.score_inputs(
          a, k_raw, v, fk, fv, history=state.history, prev_fk=state.next_fading_k[:, -1:],
          prev_fv=state.next_fading_v[:, -1:]))
    if m_f:
      parts.append((state.fading_k, state.fading_v, jnp.broadcast_to(t >= chunk, (1, m_f))))
      state = state._replace(next_fading_k=jnp.concatenate([state.next_fading_k[:, 1:], fk], axis=1),
                             next_fading_v=jnp.concatenate([state.next_fading_v[:, 1:], fv], axis=1))
    if m_e:
      parts.append((state.store.k, state.store.v, state.store.valid))
      state = state._replace(cand=insert_candidate(state.cand, score[:, 0], k_raw[:, 0], v[:, 0], t))
      if self.history_len:
        state = state._replace(history=last_inputs(a, state.history))
    o = decode_attention(q[:, 0], parts)
    return self.wo(o[:, None]), state

  def step_kv(self, a: jax.Array, fading: jax.Array | None):
    """(k, v, fk, fv) [B, 1, K, P] of one token: its key and value, and those of its fading read-out (None
    without fading tokens). Both rows go through one projection, so w_k and w_v are read once a token, and the
    fading pair passes an optimization barrier: at batch 1 XLA:GPU turned that [1, D] x [D, K·P] product into a
    reduction fused into the concatenate that shifts the fading buffer, ~0.6 ms a layer (28 ms of a 33 ms
    B'MOJO-F step at 1.4B on an H100)."""
    if fading is None or not self.cfg.fading:
      return self.wk(a), self.wv(a), None, None
    rows = jnp.concatenate([a, fading.astype(a.dtype)], axis=1)                      # [B, 2, D]
    k2, v2 = self.wk(rows), self.wv(rows)                                            # [B, 2, K, P]
    fk, fv = jax.lax.optimization_barrier((k2[:, 1:], v2[:, 1:]))
    return k2[:, :1], v2[:, :1], fk, fv

  def start_chunk(self, state: AttnState) -> AttnState:
    """The state at a chunk boundary: the candidates enter the store, the next fading tokens become current."""
    cfg = self.cfg
    if cfg.eidetic:
      state = state._replace(store=merge(state.store, state.cand, cfg.store_policy),
                             cand=empty_store(*state.cand.k.shape, state.cand.k.dtype))
    if cfg.fading:
      state = state._replace(fading_k=state.next_fading_k, fading_v=state.next_fading_v)
    return state

  @property
  def history_len(self) -> int:
    """Inputs the decode state keeps for the innovation and linear scores: 4 where they select, else none."""
    reads_history = self.cfg.selection in (Selection.INNOVATION, Selection.LINEAR)
    return PREDICTOR_TAPS if self.cfg.eidetic and reads_history else 0

  def init_state(self, batch: int, cache_size: int) -> AttnState:
    cfg = self.cfg
    kh, p, dt = cfg.kv_heads, cfg.head_size, cfg.compute.jnp_dtype
    zeros = lambda n: jnp.zeros((batch, n, kh, p), dt)
    return AttnState(k=zeros(cache_size), v=zeros(cache_size),
                     fading_k=zeros(cfg.fading), fading_v=zeros(cfg.fading),
                     next_fading_k=zeros(cfg.fading), next_fading_v=zeros(cfg.fading),
                     store=empty_store(batch, cfg.eidetic, kh, p, dt),
                     cand=empty_store(batch, cfg.eidetic_per_chunk if cfg.eidetic else 0, kh, p, dt),
                     history=jnp.zeros((batch, self.history_len, cfg.d_model), jnp.float32),
                     pos=jnp.zeros((), jnp.int32))


def ring_cache(x: jax.Array, first: jax.Array | int, end: jax.Array | int, size: int) -> jax.Array:
  """The ring of `size` slots after the tokens before `end`, from x [B, N, K, P] holding positions
  first + [0, N): slot s holds the latest position < end congruent to s mod size (as `step` writes them), zeros
  for positions below 0. The positions end - size .. end - 1 that are >= 0 must lie in x."""
  slot_pos = (end - 1) - jnp.mod(end - 1 - jnp.arange(size), size)
  rows = jnp.take(x, jnp.clip(slot_pos - first, 0, x.shape[1] - 1), axis=1)
  return jnp.where((slot_pos >= 0)[None, :, None, None], rows, 0).astype(x.dtype)


def decode_attention(q: jax.Array, parts) -> jax.Array:
  """One query per row over several key sets, one softmax: q [B, H, P]; parts [(k, v [B, S_i, K, P], valid
  [B or 1, S_i])] -> o [B, H, P] (fp32 logits and softmax; the probabilities meet v in v's dtype).

  The parts (ring cache, fading tokens, store) are attended where they lie: only their logits [B, K, G, S_i]
  are concatenated, never their keys and values, so a token reads the cache once and copies none of it.
  """
  b, h, p = q.shape
  kh = parts[0][0].shape[2]
  qg = q.reshape(b, kh, h // kh, p)
  logits = [jnp.where(valid[:, None, None, :],
                      jnp.einsum("BKGP,BSKP->BKGS", qg, k, preferred_element_type=jnp.float32) / math.sqrt(p),
                      NEG_INF) for k, _, valid in parts]
  probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
  bounds = np.cumsum([k.shape[1] for k, _, _ in parts])[:-1]
  o = sum(jnp.einsum("BKGS,BSKP->BKGP", pr.astype(v.dtype), v, preferred_element_type=jnp.float32)
          for pr, (_, v, _) in zip(jnp.split(probs, bounds, axis=-1), parts))
  return o.reshape(b, h, p).astype(q.dtype)
