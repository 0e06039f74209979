"""Triton kernel of a decode token's cache update: the ring writes, the shifts of the fading buffer and of the
innovation history, and the candidate insertion in one launch.

Shapes as in `reference.py`, with the features of a row flattened (F = K·P, padded to a power of two in the kernel
and masked). Grid (B, n_split): program (b, j) handles row b's features [j·block_f, (j+1)·block_f) (`BlockSizes.
block_f`; the D of the fading buffer and of the history split into as many blocks). It writes its part of k and v
into ring slot t mod S; with fading tokens it moves rows 1..M_f-1 of the read-out buffer [M_f, D] one row up and
writes the token's read-out into row M_f-1, and with a history rows 1..3 of history [4, D] one row up and the input
a (fp32) into row 3 (`shift_rows_up`: a row is loaded before it is overwritten, by the same threads, in program
order, so the shift is safe in place). With candidates, program (b, 0) alone owns row b's candidates: it takes the
decision (k_e scores and positions, padded to a power of two and masked on load) and, when the token replaces a
candidate, writes the whole of k_raw and v into that candidate's slot and the token's score and position into its
entries; no other program reads them, so none can see the write before deciding. The ring, the fading buffer, the
history and the candidates are updated in place (`input_output_aliases`): a token writes only its own rows (a jnp
shift of a buffer the decode loop carries is a fusion writing a new buffer and a copy back into the carry, per
buffer and layer), and nothing is left for XLA: a candidate's validity is its position (`Store.valid`: pos !=
NO_POS), so there is no flag to set.

Split rows cut the chain of dependent memory accesses a program walks: at the 1.4B shapes (K·P = D = 2048, M_f 16)
one program per row shifted 2 x 15 rows of projected fading buffers and 3 history rows in five load-then-store
groups, 7.9 us a layer on an H100 (docs/inference.md, "The current profile"); 8 programs of 256 features move
their parts in one group each.

The decision is `insert_candidate`'s with reductions Triton has (no argmax): worst = min score; among the slots at
the worst score, the latest position; among those (empty slots all hold NO_POS) the first index, as argmax picks;
replaced when the new score is strictly larger.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bmojo_jax.memory.store import Store
from bmojo_jax.pallas_kernels.decode_update.reference import Fading


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Launch parameters of the update kernel.

  num_warps: Triton's warps per program.
  block_f: features of a row per program, a power of two: a row's K·P features go to cdiv(K·P, block_f)
    programs (the fading buffer's and the history's D to as many); 0: one program per row, next_pow2(K·P) features.
  shift_rows: rows of a shifted buffer a program loads before it stores them one row up (`shift_rows_up`): the
    loads in flight, each the program's part of a row of each buffer; its registers a thread are about
    shift_rows x buffers x block_f / (32 num_warps) (16 rows of the fading buffer at block_f 256, 4 warps: 32).
  """
  num_warps: int = 4
  block_f: int = 256
  shift_rows: int = 16

  def __post_init__(self):
    for name in ("num_warps", "shift_rows"):
      if getattr(self, name) <= 0:
        raise ValueError(f"BlockSizes.{name} must be positive, got {getattr(self, name)}")
    if self.block_f < 0 or self.block_f & (self.block_f - 1):
      raise ValueError(f"BlockSizes.block_f must be 0 or a power of two, got {self.block_f}")

  def split(self, n_feat: int) -> int:
    """Programs a row's n_feat features go to."""
    return 1 if not self.block_f else -(-n_feat // self.block_f)


def next_pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def choose_candidate(score_ref, pos_ref, new_score, n_cand: int, zero):
  """(replace, index): whether the new score beats the worst of the n_cand candidates, and the worst's index
  (lowest score, latest position among ties, first index among equal positions), as `insert_candidate`. zero: a
  traced 0 (loads at a dynamic index)."""
  n = next_pow2(n_cand)
  idx = jnp.arange(n, dtype=jnp.int32)
  inside = idx < n_cand
  scores = plgpu.load(score_ref.at[pl.ds(zero, n)], mask=inside, other=jnp.inf)
  pos = plgpu.load(pos_ref.at[pl.ds(zero, n)], mask=inside, other=-1)
  worst = jnp.min(scores)
  at_worst = inside & (scores == worst)
  latest = jnp.max(jnp.where(at_worst, pos, -1))
  index = jnp.min(jnp.where(at_worst & (pos == latest), idx, n_cand - 1))
  return new_score > worst, index


def row_features(n_feat: int, n_split: int):
  """(slice, mask [block]) of this program's part of a row of n_feat features split over n_split programs (grid
  axis 1): the power-of-two block Triton loads, next_pow2(cdiv(n_feat, n_split)) features, masked."""
  block = next_pow2(-(-n_feat // n_split))
  start = pl.program_id(1) * block
  return pl.ds(start, block), start + jnp.arange(block, dtype=jnp.int32) < n_feat


def shift_rows_up(bufs, news, n_rows: int, n_feat: int, n_split: int, group: int):
  """The buffers bufs (refs [n_rows, n_feat]) one row up, in place, the new rows news (refs [n_feat], cast to the
  buffers' dtype) into the last, this program's features of each (`row_features`): rows 1..n_rows-1 loaded
  `group` at a time, then stored one row up (row i is overwritten by the group after the one that loaded it). A
  row's part is loaded and stored as [1, block] (masked) through the same ref (the same memory, one shape, so one
  layout: the thread that loads a feature of a row is the one that later overwrites it, in program order; a
  layout conversion between them would pass a barrier), so the shift needs no second buffer and no program
  touches another's features."""
  feat, in_row = row_features(n_feat, n_split)
  mask = in_row[None]
  at = lambda i: pl.ds(pl.program_id(0) * 0 + i, 1)
  for first in range(1, n_rows, group):
    rows = range(first, min(first + group, n_rows))
    loaded = [[plgpu.load(buf.at[at(i), feat], mask=mask, other=0) for buf in bufs] for i in rows]
    for i, xs in zip(rows, loaded):
      for buf, x in zip(bufs, xs):
        plgpu.store(buf.at[at(i - 1), feat], x, mask=mask)
  for buf, new in zip(bufs, news):
    x = plgpu.load(new.at[feat], mask=in_row, other=0)
    plgpu.store(buf.at[at(n_rows - 1), feat], x.astype(buf.dtype)[None], mask=mask)


def update_candidates(ins, outs, t, zero):
  """Program (b, 0)'s part: offer the token (score, k_raw, v, position t) to row b's candidates (`insert_candidate`
  with `choose_candidate`'s decision), in place through the outputs. zero: a traced 0, taken outside the branch
  this runs in (the interpreter has no program ids inside one)."""
  n_cand, n_feat = outs["cand_k"].shape
  new = plgpu.load(ins["score"].at[pl.ds(zero, 1)])                             # [1] fp32
  replace, index = choose_candidate(outs["cand_score"], outs["cand_pos"], new[0], n_cand, zero)
  block = next_pow2(n_feat)
  write = (jnp.arange(block, dtype=jnp.int32) < n_feat) & replace
  for src, dst in ((ins["k_raw"], outs["cand_k"]), (ins["v"], outs["cand_v"])):
    x = plgpu.load(src.at[pl.ds(zero, block)], mask=write, other=0)
    plgpu.store(dst.at[pl.ds(index, 1), pl.ds(zero, block)], x.astype(dst.dtype)[None], mask=write[None])
  at_index, one = pl.ds(index, 1), jnp.full((1,), replace)
  plgpu.store(outs["cand_score"].at[at_index], new.astype(outs["cand_score"].dtype), mask=one)
  plgpu.store(outs["cand_pos"].at[at_index], jnp.full((1,), t, outs["cand_pos"].dtype), mask=one)


def update_kernel(*refs, in_names: tuple[str, ...], alias_names: tuple[str, ...], n_split: int, shift_rows: int):
  """Refs: the inputs named in_names (t [], k, v [F]; with fading tokens read_out [D]; with a history a [D]; with
  candidates k_raw [F], score [1]), the aliased inputs named alias_names (ring_k, ring_v [S, F]; next_fading
  [M_f, D]; history [4, D]; cand_k, cand_v [k_e, F], cand_score, cand_pos [k_e]), then the outputs they alias, in
  the same order. The aliased inputs are not read; the buffers are read and written through their outputs."""
  n_in, n_alias = len(in_names), len(alias_names)
  ins = dict(zip(in_names, refs[:n_in]))
  outs = dict(zip(alias_names, refs[n_in + n_alias:]))
  size, n_feat = outs["ring_k"].shape
  t = ins["t"][()]
  feat, in_row = row_features(n_feat, n_split)                                   # in_row [block]
  slot = lax.rem(t, size)                                                        # t >= 0
  for src, dst in ((ins["k"], outs["ring_k"]), (ins["v"], outs["ring_v"])):
    x = plgpu.load(src.at[feat], mask=in_row, other=0)
    plgpu.store(dst.at[pl.ds(slot, 1), feat], x.astype(dst.dtype)[None], mask=in_row[None])
  if "next_fading" in outs:
    shift_rows_up((outs["next_fading"],), (ins["read_out"],), *outs["next_fading"].shape, n_split, shift_rows)
  if "history" in outs:
    shift_rows_up((outs["history"],), (ins["a"],), *outs["history"].shape, n_split, shift_rows)
  if "cand_k" in outs:
    zero = pl.program_id(0) * 0
    pl.when(pl.program_id(1) == 0)(lambda: update_candidates(ins, outs, t, zero))


def decode_token_update_gpu(ring_k, ring_v, cand: Store | None, k, v, k_raw, score, t, fading: Fading | None = None,
                            history: tuple | None = None, *, block_sizes: BlockSizes | None = None,
                            interpret: bool = False):
  """The kernel: (ring_k, ring_v, cand, next_fading or None, history or None) as the reference gives them (shapes
  checked by the caller; history (history [B, 4, D], a [B, D]) or None)."""
  blocks = block_sizes or BlockSizes()
  b, _, kh, p = ring_k.shape
  flat = lambda x: x.reshape(*x.shape[:-2], kh * p)
  ins = {"t": jnp.asarray(t, jnp.int32), "k": flat(k), "v": flat(v)}
  aliased = {"ring_k": flat(ring_k), "ring_v": flat(ring_v)}
  if fading is not None:
    aliased["next_fading"], ins["read_out"] = fading
  if history is not None:
    aliased["history"], ins["a"] = history
  if cand is not None:
    ins.update(k_raw=flat(k_raw), score=score.astype(jnp.float32)[:, None])
    aliased.update(cand_k=flat(cand.k), cand_v=flat(cand.v), cand_score=cand.score, cand_pos=cand.pos)
  n_split = blocks.split(kh * p)

  def spec(x):                  # programs (b, j): every array but t is [B, ...], a program sees row b whole
    if not x.ndim:
      return pl.BlockSpec((), lambda bi, j: ())
    return pl.BlockSpec((None, *x.shape[1:]), lambda bi, j: (bi,) + (0,) * (x.ndim - 1))

  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in aliased.values()]
  kernel = functools.partial(update_kernel, in_names=tuple(ins), alias_names=tuple(aliased), n_split=n_split,
                             shift_rows=blocks.shift_rows)
  args = [*ins.values(), *aliased.values()]
  outs = pl.pallas_call(
      kernel,
      grid=(b, n_split),
      in_specs=[spec(x) for x in args],
      out_specs=[spec(x) for x in out_shape],
      out_shape=out_shape,
      input_output_aliases={len(ins) + i: i for i in range(len(aliased))},
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
      interpret=interpret,
      name="decode_token_update",
  )(*args)
  out = dict(zip(aliased, outs))
  ring_k, ring_v = out["ring_k"].reshape(ring_k.shape), out["ring_v"].reshape(ring_v.shape)
  next_fading = None if fading is None else out["next_fading"]
  new_history = None if history is None else out["history"]
  new_cand = None if cand is None else Store(out["cand_k"].reshape(cand.k.shape), out["cand_v"].reshape(cand.v.shape),
                                             out["cand_score"], out["cand_pos"])
  return ring_k, ring_v, new_cand, next_fading, new_history
