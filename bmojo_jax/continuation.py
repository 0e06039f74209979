"""The attention sublayer continuing a decode state over a piece of T tokens (a prompt fed in pieces, a second
turn): `Attention.__call__(a, state)` calls `continue_parallel` without memory tokens (over the ring cache and
the piece) and `continue_memory` with them (through the attention function over the piece in memory chunks).
`continue_stepwise`, `Attention.step` over the piece's tokens in a `lax.scan`, is the reference of both
(tests/test_chunked_prefill.py). Each takes the `Attention` module whose projections and memory it uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from bmojo_jax.decode_cache import decode_attention, ring_cache
from bmojo_jax.kernels import get_attention_fn
from bmojo_jax.layers import rope
from bmojo_jax.memory import LastChunk, continued_memory, fading_rows
from bmojo_jax.memory.scoring import last_inputs

if TYPE_CHECKING:   # annotations only: bmojo_jax.attention imports this module
  from bmojo_jax.attention import Attention, AttnState

CONTINUE_BLOCK = 256   # queries per block of a parallel continuation (`continue_parallel`)


def continue_stepwise(attn: Attention, a: jax.Array, state: AttnState, fading: jax.Array | None, fading_norm=None
                      ) -> tuple[jax.Array, AttnState]:
  """`Attention.step` over the T tokens of a [B, T, D] (and fading, with fading_norm as `Attention.__call__`) from
  `state` -> (y [B, T, D], state): the reference of the parallel continuations (`continue_parallel`,
  `continue_memory`)."""
  def body(state, xs):
    y, state = attn.step(xs[0][:, None], state, fading=None if xs[1] is None else xs[1][:, None],
                         fading_norm=fading_norm)
    return state, y[:, 0]
  to_time = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
  state, y = jax.lax.scan(body, state, (to_time(a), to_time(fading)))
  return jnp.moveaxis(y, 0, 1), state


def continue_parallel(attn: Attention, a: jax.Array, state: AttnState, block: int = CONTINUE_BLOCK
                      ) -> tuple[jax.Array, AttnState]:
  """`continue_stepwise` without memory tokens, all T queries at once: a [B, T, D] at positions p0 + [0, T) (p0 =
  state.pos) -> (y [B, T, D], state), what `Attention.step` gives token by token (tests/test_chunked_prefill.py).

  The keys are the ring's S slots in position order (positions p0 - S .. p0 - 1, negative ones invalid)
  followed by the piece's T: ext [B, S + T, K, P]. Queries go in blocks of `block`, each attending to the
  S + block keys before its end (its window and all the ring can hold) through `decode_attention`, so the
  logits held are [block, S + block] a head, whatever T (S: the window, or max_len for full attention).
  """
  cfg = attn.cfg
  b, t, _ = a.shape
  p0, size = state.pos, state.k.shape[1]
  positions = p0 + jnp.arange(t)
  k_raw, v = attn.wk(a), attn.wv(a)
  q, k = rope(attn.wq(a), positions, cfg.rope_theta), rope(k_raw, positions, cfg.rope_theta)
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
  return attn.wo(o), state._replace(k=ring(ext_k), v=ring(ext_v), pos=p0 + t)


def continue_memory(attn: Attention, a: jax.Array, state: AttnState, fading: jax.Array, fading_norm=None
                    ) -> tuple[jax.Array, AttnState]:
  """`continue_stepwise` with memory tokens in one parallel pass: a, fading [B, T, D] (as `Attention.__call__`)
  at positions p0 + [0, T) (p0 = state.pos, any phase of the chunks) -> (y [B, T, D], state), what
  `Attention.step` gives token by token (tests/test_chunked_prefill.py).

  The memory of the chunks the piece meets comes from `continued_memory` (the state's fading tokens, store
  and candidates for the chunk it starts in, then each chunk's built as the one-pass prefill builds it). The
  attention function (`cfg.compute.attn_impl`, as in the parallel pass) runs over a frame of N = R + n·L
  positions from F = max(c0·L - R, 0) (c0 = p0 // L; R the ring's S slots rounded up to L, >= the window;
  n = ceil((T + L - 1) / L)), so the frame's chunks are the sequence's: its keys are the ring's (positions
  >= p0 - S) and the piece's, zeros elsewhere (out of every real query's window); the queries before and after
  the piece are padding, sliced off. N does not depend on p0: one compile for any phase.
  """
  cfg = attn.cfg
  b, t, _ = a.shape
  chunk, m_f = cfg.chunk, cfg.fading
  state = attn.enter_chunk(state, fading_norm)
  p0, size = state.pos, state.k.shape[1]
  positions = p0 + jnp.arange(t)
  k_raw, v = attn.wk(a), attn.wv(a)
  q, k = rope(attn.wq(a), positions, cfg.rope_theta), rope(k_raw, positions, cfg.rope_theta)
  project = attn.fading_project(fading_norm)
  fk, fv = project(fading) if cfg.scores_read_fading else (None, None)  # every position's, for the scores alone
  before = state.next_fading if m_f else None                                    # [B, M_f, D]
  prev = {}
  if cfg.scores_read_fading:                      # the projections of the read-out before the piece
    prev_fk, prev_fv = project(before[:, -1:])
    prev = dict(prev_fk=prev_fk, prev_fv=prev_fv)
  scored = attn.score_inputs(a, k_raw, v, fk, fv, history=state.history if attn.history_len else None, **prev)
  first = LastChunk(*(getattr(state, f) if getattr(cfg, need) else None for f, need in (
      ("fading_k", "fading"), ("fading_v", "fading"), ("store", "eidetic"), ("cand", "eidetic"))))
  mem = continued_memory(cfg, fading, project, scored, p0, first, before)

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
    state = state._replace(next_fading=fading_rows(fading, before, t - m_f + jnp.arange(m_f)))
  if attn.history_len:
    state = state._replace(history=last_inputs(a, state.history))
  return attn.wo(o), state
