"""Triton kernel of a decode token's cache update: the ring writes, the fading buffers' shift and the candidate
insertion in one launch.

Shapes as in `reference.py`, with the features of a row flattened (F = K·P, padded to a power of two in the kernel
and masked). One program per row b of the grid (B,): it writes k and v into ring slot t mod S; with fading tokens
it moves rows 1..M_f-1 of next_fading_k, next_fading_v one row up and writes the read-out fk, fv into row M_f-1
(`shift_fading`: a row is loaded before it is overwritten, by the same threads, in program order, so the shift is
safe in place); with candidates it takes the row's candidate decision (k_e scores and positions, padded to a power
of two and masked on load) and, when the token replaces a candidate, writes k_raw, v, the score and the position t
into that candidate's slot. Every array is updated in place (`input_output_aliases`): a token writes only its own
rows, nothing else is read or copied (a jnp shift of the fading buffers is a fusion writing a new buffer and a copy
back into the decode loop's carry, per buffer and layer). The features are not split over programs: a program
reading the candidates' scores could then see another's write of the new score (no order between programs) and
choose another slot; a row is a few KB (K·P = 2048 at 1.4B), and the batch-1 launch is one program either way.

The decision is `insert_candidate`'s with reductions Triton has (no argmax): worst = min score; among the slots at
the worst score, the latest position; among those (empty slots all hold NO_POS) the first index, as argmax picks;
replaced when the new score is strictly larger. valid stays out of the kernel (Triton has no bool refs): the kernel
returns the replaced index (-1: none) and `valid | (slot == index)` is one elementwise XLA op, where converting
valid to int8 and back around the kernel would be two.
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

  num_warps: Triton's warps per program (one program per row, next_pow2(K·P) features).
  shift_rows: fading rows a program loads before it stores them one row up (`shift_fading`): the loads in
    flight, each next_pow2(K·P) features of each buffer (4: 64 registers a thread at K·P = 2048 bf16, 4 warps).
  """
  num_warps: int = 4
  shift_rows: int = 4

  def __post_init__(self):
    for name in ("num_warps", "shift_rows"):
      if getattr(self, name) <= 0:
        raise ValueError(f"BlockSizes.{name} must be positive, got {getattr(self, name)}")


def next_pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def choose_candidate(score_ref, pos_ref, new_score, n_cand: int):
  """(replace, index): whether the new score beats the worst of the n_cand candidates, and the worst's index
  (lowest score, latest position among ties, first index among equal positions), as `insert_candidate`."""
  n = next_pow2(n_cand)
  idx = jnp.arange(n, dtype=jnp.int32)
  inside = idx < n_cand
  zero = pl.program_id(0) * 0                                         # a traced 0: loads at a dynamic index
  scores = plgpu.load(score_ref.at[pl.ds(zero, n)], mask=inside, other=jnp.inf)
  pos = plgpu.load(pos_ref.at[pl.ds(zero, n)], mask=inside, other=-1)
  worst = jnp.min(scores)
  at_worst = inside & (scores == worst)
  latest = jnp.max(jnp.where(at_worst, pos, -1))
  index = jnp.min(jnp.where(at_worst & (pos == latest), idx, n_cand - 1))
  return new_score > worst, index


def shift_fading(bufs, news, n_rows: int, zero, feat, in_row, group: int):
  """The fading buffers bufs (refs [M_f, F]) one row up, in place, the new rows news (refs [F], cast to the
  buffers' dtype) into the last: rows 1..M_f-1 loaded `group` at a time, then stored one row up (row i is
  overwritten by the group after the one that loaded it). A row is loaded and stored as [1, block_f] through the
  same ref (the same memory, one shape, so one layout: the thread that loads a feature of a row is the one that
  later overwrites it, in program order; a layout conversion between them would pass a barrier), so the shift
  needs no second buffer and no program touches another's rows."""
  mask = in_row[None]
  at = lambda i: pl.ds(zero + i, 1)
  for first in range(1, n_rows, group):
    rows = range(first, min(first + group, n_rows))
    loaded = [[plgpu.load(buf.at[at(i), feat], mask=mask, other=0) for buf in bufs] for i in rows]
    for i, xs in zip(rows, loaded):
      for buf, x in zip(bufs, xs):
        plgpu.store(buf.at[at(i - 1), feat], x, mask=mask)
  for buf, new in zip(bufs, news):
    x = plgpu.load(new.at[feat], mask=in_row, other=0)
    plgpu.store(buf.at[at(n_rows - 1), feat], x.astype(buf.dtype)[None], mask=mask)


def update_kernel(*refs, has_cand: bool, size: int, n_feat: int, n_cand: int, n_fading: int, block_f: int,
                  shift_rows: int):
  """Refs: t [], k, v [F], (fk, fv [F]), (k_raw [F], score [1]), the aliased inputs ring k, v [S, F], (next
  fading k, v [M_f, F]), (cand k, v [k_e, F], cand score, pos [k_e]), then the outputs they alias, in the same
  order, (and the replaced index [1] int32). Of the aliased inputs only the candidates' scores and positions are
  read, before anything is written; the fading buffers are shifted through their outputs (`shift_fading`)."""
  n_in = 3 + 2 * (n_fading > 0) + 2 * has_cand
  n_alias = 2 + 2 * (n_fading > 0) + 4 * has_cand
  ins, aliased, outs = refs[:n_in], refs[n_in:n_in + n_alias], refs[n_in + n_alias:]
  t = ins[0][()]
  zero = pl.program_id(0) * 0                                     # a traced 0: loads at a dynamic index
  feat = pl.ds(zero, block_f)
  in_row = jnp.arange(block_f, dtype=jnp.int32) < n_feat                         # [block_f]
  slot = lax.rem(t, size)                                                        # t >= 0
  for src, dst in ((ins[1], outs[0]), (ins[2], outs[1])):
    x = plgpu.load(src.at[feat], mask=in_row, other=0)
    plgpu.store(dst.at[pl.ds(slot, 1), feat], x.astype(dst.dtype)[None], mask=in_row[None])
  if n_fading:
    shift_fading(outs[2:4], ins[3:5], n_fading, zero, feat, in_row, shift_rows)
  if not has_cand:
    return
  v_ref, (k_raw_ref, new_ref) = ins[2], ins[-2:]
  ck_ref, cv_ref, cs_ref, cp_ref, index_ref = outs[-5:]
  new = plgpu.load(new_ref.at[pl.ds(zero, 1)])                                  # [1] fp32
  replace, index = choose_candidate(aliased[-2], aliased[-1], new[0], n_cand)
  write = in_row & replace
  for src, dst in ((k_raw_ref, ck_ref), (v_ref, cv_ref)):
    x = plgpu.load(src.at[feat], mask=write, other=0)
    plgpu.store(dst.at[pl.ds(index, 1), feat], x.astype(dst.dtype)[None], mask=write[None])
  one = jnp.full((1,), replace)
  plgpu.store(cs_ref.at[pl.ds(index, 1)], new.astype(cs_ref.dtype), mask=one)
  plgpu.store(cp_ref.at[pl.ds(index, 1)], jnp.full((1,), t, jnp.int32), mask=one)
  index_ref[...] = jnp.full((1,), jnp.where(replace, index, -1), jnp.int32)


def decode_token_update_gpu(ring_k, ring_v, cand: Store | None, k, v, k_raw, score, t, fading: Fading | None = None,
                            *, block_sizes: BlockSizes | None = None, interpret: bool = False):
  """The kernel and the valid flags: (ring_k, ring_v, cand, (next_k, next_v) or None) as the reference gives them
  (shapes checked by the caller)."""
  blocks = block_sizes or BlockSizes()
  b, size, kh, p = ring_k.shape
  n_feat = kh * p
  block_f = next_pow2(n_feat)
  flat = lambda x: x.reshape(*x.shape[:-2], n_feat)
  sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  has_cand = cand is not None
  n_cand = cand.k.shape[1] if has_cand else 0
  n_fading = 0 if fading is None else fading.next_k.shape[1]
  row = lambda *shape: pl.BlockSpec((None, *shape), lambda bi: (bi,) + (0,) * len(shape))
  scalar = pl.BlockSpec((), lambda bi: ())
  ins, in_specs = [jnp.asarray(t, jnp.int32), flat(k), flat(v)], [scalar, row(n_feat), row(n_feat)]
  aliased, alias_specs = [flat(ring_k), flat(ring_v)], [row(size, n_feat)] * 2
  if n_fading:
    ins += [flat(fading.fk), flat(fading.fv)]
    in_specs += [row(n_feat)] * 2
    aliased += [flat(fading.next_k), flat(fading.next_v)]
    alias_specs += [row(n_fading, n_feat)] * 2
  if has_cand:
    ins += [flat(k_raw), score.astype(jnp.float32)[:, None]]
    in_specs += [row(n_feat), row(1)]
    aliased += [flat(cand.k), flat(cand.v), cand.score, cand.pos]
    alias_specs += [row(n_cand, n_feat)] * 2 + [row(n_cand)] * 2
  out_shape = [sds(x) for x in aliased] + ([jax.ShapeDtypeStruct((b, 1), jnp.int32)] if has_cand else [])
  out_specs = alias_specs + ([row(1)] if has_cand else [])
  kernel = functools.partial(update_kernel, has_cand=has_cand, size=size, n_feat=n_feat, n_cand=n_cand,
                             n_fading=n_fading, block_f=block_f, shift_rows=blocks.shift_rows)
  outs = pl.pallas_call(
      kernel,
      grid=(b,),
      in_specs=in_specs + alias_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases={len(ins) + i: i for i in range(len(aliased))},
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
      interpret=interpret,
      name="decode_token_update",
  )(*ins, *aliased)
  ring_k, ring_v = (o.reshape(x.shape) for o, x in zip(outs[:2], (ring_k, ring_v)))
  next_fading = None
  if n_fading:
    next_fading = tuple(o.reshape(x.shape) for o, x in zip(outs[2:4], fading[:2]))
  if not has_cand:
    return ring_k, ring_v, None, next_fading
  ck, cv, cs, cp, index = outs[-5:]
  valid = cand.valid | (jnp.arange(n_cand, dtype=jnp.int32) == index)                # index [B, 1]
  return ring_k, ring_v, Store(ck.reshape(cand.k.shape), cv.reshape(cand.v.shape), cs, cp, valid), next_fading
