"""Tile sizes and block-range arithmetic shared by the forward and backward kernels.

A query block covers rows [i·bq, (i+1)·bq); a key block covers [j·bk, (j+1)·bk). Query t sees key s when
t - window < s <= t. Every kernel loops over the blocks that intersect a band of that shape, split into
three runs: masked, unmasked (every pair visible, so no mask arithmetic), masked. See `split_range`.

Packed rows (segment_ids): segments are contiguous runs, so with causality "same segment" is one bound per
position: key s <= t is in query t's segment iff s >= seg_lo[t] (the first position of t's segment) iff
t <= seg_hi[s] (the last position of s's segment); both are nondecreasing in the position (`ops.py` builds
them). A block's band and its unmasked run then shrink by the bounds of its first and last rows: blocks
before a query block's segments are skipped, and a block in one segment with every row of the query block
still needs no mask.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import jax.numpy as jnp
from jax import lax


class KernelImpl(enum.StrEnum):
  """Which kernel runs the forward, the dq or the dk/dv pass (`BlockSizes.forward_impl`, `dq_impl`, `dkdv_impl`;
  resolved in `ops.resolve_impls`). Strings are accepted wherever a KernelImpl is."""
  AUTO = "auto"        # mosaic on a compute-capability-9 GPU when the shapes allow it, else triton
  TRITON = "triton"    # `forward.py` / `backward.py` (GPU through Triton; CPU in interpret mode)
  MOSAIC = "mosaic"    # `forward_mosaic.py` / `dq_mosaic.py` / `dkdv_mosaic.py` (Hopper, Mosaic GPU)


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Tiles and Triton launch parameters of the three kernels (powers of two; >= 16 on GPU).

  block_q, block_k:         forward query / key tile.
  block_q_dkv, block_k_dkv: dk/dv kernel (one program per key block, loop over query blocks).
  block_q_dq, block_k_dq:   dq kernel (one program per query block, loop over key blocks); block_q_dq is
                            also the query tile of the memory dk/dv kernel.
  num_warps_*, num_stages_*: Triton's warps per program and software-pipelining depth.
  split_masked: loop over the band as masked / unmasked / masked runs (True) or as one masked loop
                (False: one software pipeline, but mask arithmetic on every tile).
  fast_math:    the softmax's exp2 as one PTX `ex2.approx.ftz` (and its rescale as FMAs) instead of
                libdevice's exact exp2f (pallas_kernels/fast_math.py; Mosaic: `approx_math`); ignored in
                interpret mode.
  forward_impl: a `KernelImpl` (or its string): "triton" (`forward.py`), "mosaic" (`forward_mosaic.py`,
                Hopper, warp-specialized) or "auto": mosaic on a compute-capability-9 GPU when the shapes
                allow it, else triton (`ops.resolve_impls`).
  dq_impl, dkdv_impl: the backward's dq and dk/dv kernels, chosen the same way: "triton"
                (`backward.dq_kernel`, `backward.dkdv_kernel`), "mosaic" (`dq_mosaic.py`, `dkdv_mosaic.py`)
                or "auto". The memory's dk/dv kernel is Triton either way. `ops.py` launches the chosen ones.
  block_q_mosaic, block_k_mosaic, num_stages_mosaic: the Mosaic kernels' rows (dk/dv: keys) per consumer
                warpgroup (a CTA holds two), the forward's key tile and its key/value shared-memory slots.
  block_k_dq_mosaic: the Mosaic dq kernel's key tile (64 beat 128 on the H100; docs/window_attention_notes.md, v7).
  block_q_dkv_mosaic: the Mosaic dk/dv kernel's query tile (its CTA holds 2 x block_q_mosaic keys).
  num_stages_bwd_mosaic: shared-memory slots of the streamed tiles in the Mosaic dq (keys, values) and dk/dv
                (queries, output gradients) kernels.

  block_q and block_q_dq are shrunk (halved) until they divide the chunk length, because a query block
  reads the memory of one chunk. Every block is shrunk to at most next_pow2(T).
  """
  block_q: int = 64
  block_k: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  num_warps_fwd: int = 4
  num_stages_fwd: int = 3
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2
  split_masked: bool = True
  fast_math: bool = True    # compiled kernels: PTX ex2.approx.ftz / fma.rn for the softmax
                            # (pallas_kernels/fast_math.py); interpret mode always uses plain jnp
  forward_impl: KernelImpl = KernelImpl.AUTO
  block_q_mosaic: int = 64
  block_k_mosaic: int = 128
  num_stages_mosaic: int = 2
  dq_impl: KernelImpl = KernelImpl.AUTO
  block_k_dq_mosaic: int = 64
  dkdv_impl: KernelImpl = KernelImpl.AUTO
  block_q_dkv_mosaic: int = 64
  num_stages_bwd_mosaic: int = 2

  def __post_init__(self):
    for field in ("forward_impl", "dq_impl", "dkdv_impl"):   # a string becomes its KernelImpl
      value = getattr(self, field)
      try:
        object.__setattr__(self, field, KernelImpl(value))
      except ValueError:
        raise ValueError(f"{field} {value!r} is not one of {[e.value for e in KernelImpl]}") from None

  @classmethod
  def get_default(cls, head_dim: int = 128, has_memory: bool = False) -> "BlockSizes":
    """The fastest measured on an H100 (timings in docs/window_attention_notes.md). With memory, the forward
    keeps two pipeline stages instead of three: the memory tiles' shared memory on top of three stages costs
    half the resident programs (v4). With the fast-math softmax the dq kernel's best key tile moved from 32
    to 64 (v5)."""
    del head_dim  # the H100 sweep found 4 warps best at P=128 too
    return cls(num_stages_fwd=2) if has_memory else cls()

  def fitted(self, seq_len: int, chunk: int) -> "BlockSizes":
    """Blocks no larger than next_pow2(seq_len); query blocks that read memory divide `chunk`."""
    cap = 1 << max(0, (seq_len - 1).bit_length())

    def fit(b, divide_chunk):
      b = min(b, cap)
      while divide_chunk and chunk % b:
        b //= 2
      return max(b, 1)

    return dataclasses.replace(
        self, block_q=fit(self.block_q, True), block_k=fit(self.block_k, False),
        block_q_dkv=fit(self.block_q_dkv, False), block_k_dkv=fit(self.block_k_dkv, False),
        block_q_dq=fit(self.block_q_dq, True), block_k_dq=fit(self.block_k_dq, False))

  @property
  def pad_multiple(self) -> int:
    """T is padded to a multiple of this (every block is a power of two); a Mosaic kernel's CTA holds
    two query blocks."""
    mosaic = (2 * self.block_q_mosaic, self.block_k_mosaic) if self.forward_impl == "mosaic" else ()
    if self.dq_impl == "mosaic":
      mosaic += (2 * self.block_q_mosaic, self.block_k_dq_mosaic)
    if self.dkdv_impl == "mosaic":
      mosaic += (2 * self.block_q_mosaic, self.block_q_dkv_mosaic)
    return max(self.block_q, self.block_k, self.block_q_dkv, self.block_k_dkv, self.block_q_dq,
               self.block_k_dq, *mosaic)


def cdiv(x, n: int):
  """ceil(x / n) for a non-negative traced int."""
  return lax.div(x + (n - 1), n)


def split_range(lo, hi, full_lo, full_hi):
  """[lo, hi) -> (lo, x, y, hi): masked [lo, x), unmasked [x, y), masked [y, hi).

  [full_lo, full_hi) is the run of blocks that need no mask; it may be empty or reversed.
  """
  x = jnp.clip(full_lo, lo, hi)
  y = jnp.clip(full_hi, x, hi)
  return x, y


def band_loop(lo, x, y, hi, body, carry, split: bool):
  """Runs body(j, carry, masked=...) over [lo, hi), split at x, y as `split_range` describes."""
  if not split:
    return lax.fori_loop(lo, hi, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(lo, x, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(x, y, functools.partial(body, masked=False), carry)
  return lax.fori_loop(y, hi, functools.partial(body, masked=True), carry)


def key_band(q_start, block_q: int, block_k: int, window: int | None, n_k: int, seg_first=None):
  """Key blocks [lo, hi) that query rows [q_start, q_start + block_q) see at all. Packed rows: seg_first =
  seg_lo of the first row (every row's segment starts there or later)."""
  hi = jnp.minimum(lax.div(q_start + block_q - 1, block_k) + 1, n_k)
  lo = jnp.int32(0) if window is None else lax.div(jnp.maximum(q_start - window + 1, 0), block_k)
  if seg_first is not None:
    lo = jnp.maximum(lo, lax.div(seg_first, block_k))
  return lo, hi


def fully_visible_key_blocks(q_start, block_q: int, block_k: int, window: int | None, seg_last=None):
  """Key blocks [full_lo, full_hi) whose every key every row of [q_start, q_start + block_q) sees (may be
  empty or reversed). Packed rows: seg_last = seg_lo of the last row (the largest of the block)."""
  full_hi = lax.div(q_start + 1, block_k)                      # every key <= q_start
  full_lo = jnp.int32(0)
  if window is not None:
    full_lo = cdiv(jnp.maximum(q_start + block_q - window, 0), block_k)  # every key > q_last - window
  if seg_last is not None:
    full_lo = jnp.maximum(full_lo, cdiv(seg_last, block_k))    # every key in every row's segment
  return full_lo, full_hi


def key_blocks_for_query_block(q_start, block_q: int, block_k: int, window: int | None, n_k: int,
                               seg_lo=None):
  """Key blocks seen by query rows [q_start, q_start + block_q): (lo, x, y, hi) for `split_range`.
  Packed rows: seg_lo = (seg_lo of the first row, of the last row)."""
  seg_first, seg_last = (None, None) if seg_lo is None else seg_lo
  lo, hi = key_band(q_start, block_q, block_k, window, n_k, seg_first)
  x, y = split_range(lo, hi, *fully_visible_key_blocks(q_start, block_q, block_k, window, seg_last))
  return lo, x, y, hi


def query_band(k_start, block_k: int, block_q: int, window: int | None, n_q: int, seg_last=None):
  """Query blocks [lo, hi) that see any of key rows [k_start, k_start + block_k). Packed rows: seg_last =
  seg_hi of the last key (every key's segment ends there or earlier)."""
  lo = lax.div(k_start, block_q)
  hi = jnp.int32(n_q)
  if window is not None:
    hi = jnp.minimum(lax.div(k_start + block_k - 1 + window - 1, block_q) + 1, n_q)
  if seg_last is not None:
    hi = jnp.minimum(hi, lax.div(seg_last, block_q) + 1)
  return lo, hi


def fully_visible_query_blocks(k_start, block_k: int, block_q: int, window: int | None, n_q: int,
                               seg_first=None):
  """Query blocks [full_lo, full_hi) every row of which sees every key of [k_start, k_start + block_k)
  (may be empty or reversed). Packed rows: seg_first = seg_hi of the first key (the smallest)."""
  full_lo = cdiv(k_start + block_k - 1, block_q)               # every query >= the last key
  full_hi = jnp.int32(n_q)
  if window is not None:
    full_hi = lax.div(k_start + window, block_q)               # every query < k_start + window
  if seg_first is not None:
    full_hi = jnp.minimum(full_hi, lax.div(seg_first + 1, block_q))   # every query in every key's segment
  return full_lo, full_hi


def query_blocks_for_key_block(k_start, block_q: int, block_k: int, window: int | None, n_q: int,
                               seg_hi=None):
  """Query blocks that see key rows [k_start, k_start + block_k): (lo, x, y, hi) for `split_range`.
  Packed rows: seg_hi = (seg_hi of the first key, of the last key)."""
  seg_first, seg_last = (None, None) if seg_hi is None else seg_hi
  lo, hi = query_band(k_start, block_k, block_q, window, n_q, seg_last)
  x, y = split_range(lo, hi, *fully_visible_query_blocks(k_start, block_k, block_q, window, n_q, seg_first))
  return lo, x, y, hi


def visible(q_pos, k_pos, window: int | None, q_seg_lo=None, k_seg_hi=None):
  """Broadcast bool mask: key k_pos visible from query q_pos. Packed rows: q_seg_lo (the query's segment
  start, broadcast like q_pos) or k_seg_hi (the key's segment end, like k_pos); with causality either one
  alone says "same segment"."""
  vis = k_pos <= q_pos
  if window is not None:
    vis = vis & (k_pos > q_pos - window)
  if q_seg_lo is not None:
    vis = vis & (k_pos >= q_seg_lo)
  if k_seg_hi is not None:
    vis = vis & (q_pos <= k_seg_hi)
  return vis


def in_span(span_lo, span_hi, offset):
  """Broadcast bool mask: a memory slot with span [span_lo, span_hi) visible from a query at `offset` in its
  chunk."""
  return (span_lo <= offset) & (offset < span_hi)
