"""Attention: full causal, sliding window, and the B'MOJO memory attention (window + fading + eidetic).

Query t in chunk c = t // L attends to (docs/spec.md, "Memory attention")
  1. window keys t - w < t' <= t (RoPE on queries and window keys; all t' <= t when window is None);
  2. the fading tokens of chunk c: the projected mixer outputs at the last M_f positions of chunk c-1;
  3. the eidetic store as it stands at the end of chunk c-1 (keys without RoPE), filled by the tokens that
     `cfg.selection`'s score ranks highest in each chunk (`bmojo_jax.memory`).
Chunk 0 has no memory. The parallel pass projects, asks `chunk_memory` for the memory tokens of every chunk
and calls the attention function `cfg.compute.attn_impl` names (`bmojo_jax.kernels`); the decode step attends over a
ring buffer of the last w keys plus the same memory (`bmojo_jax.decode_cache`) through the decode attention and
cache update `cfg.compute.decode_attn_impl` names (`bmojo_jax.kernels.get_decode_attention_fn`,
`get_decode_update_fn`), and carries an `AttnState`; a
continuation from a state runs in parallel (`bmojo_jax.continuation`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from bmojo_jax import typing as tp
from bmojo_jax.config import ModelConfig, Selection
from bmojo_jax.continuation import continue_memory, continue_parallel
from bmojo_jax.decode_cache import ring_cache
from bmojo_jax.kernels import get_attention_fn, get_decode_attention_fn, get_decode_update_fn
from bmojo_jax.layers import einsum_layer, param, rope
from bmojo_jax.memory import chunk_memory
from bmojo_jax.memory.scoring import PREDICTOR_TAPS, ScoreInputs, last_inputs, selection_scores
from bmojo_jax.memory.store import Store, empty_store, merge
from bmojo_jax.pallas_kernels.decode_update import Fading
from bmojo_jax.segments import Packing


class AttnState(NamedTuple):
  """Decode cache of one attention sublayer. Sizes: S ring slots, M_f fading, M_e store, k_e candidates."""
  k: jax.Array                  # [B, S, K, P] ring of the last S keys (RoPE applied); slot = position % S
  v: jax.Array                  # [B, S, K, P]
  fading_k: jax.Array           # [B, M_f, K, P] the current chunk's fading tokens
  fading_v: jax.Array
  next_fading: jax.Array        # [B, M_f, D] the last M_f read-outs of the mixer, before their norm and projection
  store: Store                  # [B, M_e, …] the eidetic store at the end of the previous chunk
  cand: Store                   # [B, k_e, …] the current chunk's selections so far
  history: jax.Array            # [B, 4, D] fp32, the innovation test's last inputs ([B, 0, D] where unread)
  pos: jax.Array                # [] int32, tokens seen


CHUNK_FIELDS = ("fading_k", "fading_v", "store", "cand")   # what `Attention.start_chunk` changes


def chunk_boundary(pos: jax.Array, chunk: int) -> jax.Array:
  """Whether the token at position pos (a device scalar) is the first of a memory chunk after chunk 0, where the
  chunk-boundary work (`Attention.start_chunk`) runs before it."""
  return (pos % chunk == 0) & (pos > 0)


def run_if(pred: jax.Array, fn, x):
  """fn(x) where the device bool pred holds, else x: a `lax.while_loop` of zero or one trips, not a `lax.cond`.
  A loop updates its carry in place, so a trip not taken costs one read of pred; a conditional writes all of its
  outputs on either branch, and XLA:GPU copies every array of x in the branch that returns it unchanged (567
  copies, 0.71 of 2.78 ms, in a B'MOJO 1.4B batch-1 decode token on an H100). Either way the host reads pred.
  Forward only, as decoding is: a while loop has no reverse-mode derivative."""
  return jax.lax.while_loop(lambda carry: carry[0], lambda carry: (jnp.zeros_like(pred), fn(carry[1])),
                            (pred, x))[1]


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
    return tuple(w(flat).reshape(*x.shape[:-1], *w.out_shape) for w in (self.wk, self.wv))

  def fading_project(self, fading_norm=None):
    """rows [B, ..., D] of read-outs (before their norm, when fading_norm) -> their keys and values [B, ..., K, P]:
    how a fading token is made of its read-out."""
    if fading_norm is None:
      return self.fading_kv
    return lambda rows: self.fading_kv(fading_norm(rows))

  def fading_parts(self, fading: jax.Array | None, fading_norm=None):
    """(source, project, fk, fv): what the fading tokens are cut from, and how the cut [B, ..., *] becomes their
    keys and values [B, ..., K, P]. Usually the source is the read-outs fading [B, T, D] and only the cut is
    normalized (fading_norm, when the read-outs come before their norm) and projected (M_f per chunk); a
    selection that scores with the projections at every position (`cfg.scores_read_fading`) gets them as fk,
    fv [B, T, K, P], and the tokens are cut from those, projected once. fk, fv are None otherwise."""
    if not self.cfg.scores_read_fading:
      return fading, self.fading_project(fading_norm), None, None
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
    to the rows cut from it only (`fading_parts`). With cache_size (ring slots; the window, or the maximum length
    for full attention) also returns the decode state after the last token. With `packing` (several documents per
    row) no key or memory token of one document is visible to another, and chunks count from each document's
    first token. A continuation (a prompt fed in pieces, a second turn) attends in parallel too
    (`bmojo_jax.continuation`): without memory tokens over the ring cache and the piece (`continue_parallel`),
    with them through the attention function over the piece in memory chunks (`continue_memory`);
    `continue_stepwise`, `step` over its tokens in a `lax.scan`, is the reference of both
    (tests/test_chunked_prefill.py).
    """
    if state is not None:
      if packing is not None:
        raise NotImplementedError("a continuation from a decode state takes one document per row")
      if not (self.cfg.fading or self.cfg.eidetic):
        return continue_parallel(self, a, state)
      return continue_memory(self, a, state, fading, fading_norm)
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
      pad = [(0, 0), (max(0, m_f - t), 0), (0, 0)]
      state = state._replace(next_fading=jnp.pad(fading, pad)[:, -m_f:].astype(state.next_fading.dtype))
    if self.history_len:                            # the only score that reads earlier inputs
      state = state._replace(history=last_inputs(a))
    return y, state


  def step(self, a: jax.Array, state: AttnState, *, fading: jax.Array | None = None, fading_norm=None,
           entered: bool = False) -> tuple[jax.Array, AttnState]:
    """One token at position state.pos. a, fading [B, 1, D] -> (y [B, 1, D], new state); fading_norm as in
    `__call__` (the same for every call on a state: the read-outs are kept as given and normed when projected).

    The chunk-boundary work (`start_chunk`: the store merge, a sort over M_e + k_e entries, the projection of the
    M_f read-outs that become the fading tokens) runs only at the first token of a chunk, conditioned on the
    device scalar state.pos (`enter_chunk`): every other token does only its own work (`step_select` is the
    branch-free form, which computes the boundary work at every token and selects it). entered: the caller ran
    it already (`LanguageModel.enter_chunk`: one condition for all layers), so the step skips it.
    """
    return self._token_step(a, state if entered else self.enter_chunk(state, fading_norm), fading, fading_norm)

  def enter_chunk(self, state: AttnState, fading_norm=None) -> AttnState:
    """The state with the memory of the chunk holding position state.pos current: at a chunk's first token
    (after chunk 0) `start_chunk`, run on the device scalar state.pos (`run_if`); else the state as it is."""
    if not (self.cfg.eidetic or self.cfg.fading):
      return state
    boundary = chunk_boundary(state.pos, self.cfg.chunk)
    start = lambda f: self._chunk_fields(self.start_chunk(state._replace(**f), fading_norm))
    return state._replace(**run_if(boundary, start, self._chunk_fields(state)))

  def step_select(self, a: jax.Array, state: AttnState, *, fading: jax.Array | None = None, fading_norm=None
                  ) -> tuple[jax.Array, AttnState]:
    """`step` without a conditional: the chunk-boundary work is computed at every token and selected by the
    boundary flag (the reference of `step`'s `run_if`: the same computation; compiled as another program, its
    floats may differ from `step`'s in the last bits)."""
    t = state.pos
    if self.cfg.eidetic or self.cfg.fading:
      boundary = chunk_boundary(t, self.cfg.chunk)
      new = self._chunk_fields(self.start_chunk(state, fading_norm))
      state = state._replace(**jax.tree.map(lambda x, y: jnp.where(boundary, x, y), new,
                                            self._chunk_fields(state)))
    return self._token_step(a, state, fading, fading_norm)

  @staticmethod
  def _chunk_fields(state: AttnState) -> dict:
    return {f: getattr(state, f) for f in CHUNK_FIELDS}

  def _token_step(self, a: jax.Array, state: AttnState, fading: jax.Array | None, fading_norm
                  ) -> tuple[jax.Array, AttnState]:
    """The work of the token at state.pos alone, the chunk's memory already current (`step`). Its read-out
    (fading) only joins the buffer of the last M_f: it is projected at the chunk boundary if it is among them
    (`start_chunk`), here only for a selection that scores with the projections (`cfg.scores_read_fading`)."""
    cfg = self.cfg
    t = state.pos
    chunk, m_f, m_e = cfg.chunk, cfg.fading, cfg.eidetic
    if m_f and fading is None:
      raise ValueError("this attention has fading tokens: step takes its read-out (fading [B, 1, D])")

    k_raw, v = self.wk(a), self.wv(a)                                                 # [B, 1, K, P]
    q, k = rope(self.wq(a), t[None], cfg.rope_theta), rope(k_raw, t[None], cfg.rope_theta)
    memory_fading, store = None, None               # the memory parts the query sees besides the ring
    cand, score = None, None                        # the chunk's candidates and the token's score (eidetic)
    if m_e:   # scored before the fading buffer moves on: its last entry is the read-out at t-1
      fk = fv = prev_fk = prev_fv = None
      if cfg.scores_read_fading:                    # the projections of the read-outs at t-1 and t
        pair = jnp.concatenate([state.next_fading[:, -1:], fading.astype(state.next_fading.dtype)], axis=1)
        pk, pv = self.fading_project(fading_norm)(pair)                              # [B, 2, K, P]
        prev_fk, fk, prev_fv, fv = pk[:, :1], pk[:, 1:], pv[:, :1], pv[:, 1:]
      score, _ = selection_scores(cfg.selection, self.score_inputs(
          a, k_raw, v, fk, fv, history=state.history, prev_fk=prev_fk, prev_fv=prev_fv))
      cand, score = state.cand, score[:, 0]
    # k, v into ring slot t mod S, the token offered to the chunk's candidates, the fading buffer shifted by its
    # read-out and the innovation history by its input, in one kernel in place with "pallas"
    update = get_decode_update_fn(cfg.compute.decode_attn_impl)
    ring_k, ring_v, cand, next_fading, history = update(
        state.k, state.v, cand, k[:, 0], v[:, 0], k_raw[:, 0] if m_e else None, score, t,
        Fading(state.next_fading, fading[:, 0]) if m_f else None,
        (state.history, a[:, 0]) if self.history_len else None)
    state = state._replace(k=ring_k, v=ring_v, pos=t + 1)
    if m_f:
      memory_fading = (state.fading_k, state.fading_v)
      state = state._replace(next_fading=next_fading)
    if m_e:
      store = (state.store.k, state.store.v, state.store.pos)
      state = state._replace(cand=cand)
    if self.history_len:
      state = state._replace(history=history)
    attend = get_decode_attention_fn(cfg.compute.decode_attn_impl)
    o = attend(q[:, 0], ring_k, ring_v, t, window=cfg.window, chunk=chunk, fading=memory_fading, store=store)
    return self.wo(o[:, None]), state

  def start_chunk(self, state: AttnState, fading_norm=None) -> AttnState:
    """The state at a chunk boundary: the candidates enter the store, the read-outs of the last M_f tokens become
    the fading tokens (normed with fading_norm, as the steps got them, and projected)."""
    cfg = self.cfg
    if cfg.eidetic:
      state = state._replace(store=merge(state.store, state.cand, cfg.store_policy),
                             cand=empty_store(*state.cand.k.shape, state.cand.k.dtype))
    if cfg.fading:
      fk, fv = self.fading_project(fading_norm)(state.next_fading)
      state = state._replace(fading_k=fk.astype(state.fading_k.dtype), fading_v=fv.astype(state.fading_v.dtype))
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
                     next_fading=jnp.zeros((batch, cfg.fading, cfg.d_model), dt),
                     store=empty_store(batch, cfg.eidetic, kh, p, dt),
                     cand=empty_store(batch, cfg.eidetic_per_chunk if cfg.eidetic else 0, kh, p, dt),
                     history=jnp.zeros((batch, self.history_len, cfg.d_model), jnp.float32),
                     pos=jnp.zeros((), jnp.int32))
