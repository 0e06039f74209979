"""Mosaic-TPU memory attention: `memory_attention_tpu`, forward, dq, dk/dv and d(memory) Pallas TPU kernels
behind a custom VJP that saves only the logsumexp (the public entry,
`pallas_kernels.window_attention.memory_attention(backend="tpu")`, checks the inputs and shards).

Same semantics as `memory_attention_reference`: q [B, T, H, P]; k, v [B, T, K, P]; mem_k, mem_v
[B, C, M, K, P] and mem_valid [B, C, M] with C = ceil(T / L); optional segment_ids [B, T] and mem_span
[B, C, 2, M]. Returns o [B, T, H, P] in q.dtype.

Layout: heads before time, q [B, H, T_pad, P], k, v [B, K, T_pad, P], memory [B, K, C, M_pad, P]; T padded to
C·L (padding keys come after every real query, so causality hides them), M to a multiple of 8 (padding slots
invalid). Queries and keys are cut into blocks of `bl` rows (a multiple of 8 dividing the chunk L), so a query
block lies in one chunk and the window (a multiple of L) is a whole number of key blocks.

Block sparsity (splash attention's idea, with the sparsity known statically): query block i sees only the
key blocks i - R … i of its band (R = window / bl; all earlier blocks without a window) and then its chunk's
memory. The kernels' last grid axis walks those R + 1 (+ 1 memory) steps, "arbitrary", carrying the online
softmax (m, l, acc) in VMEM; a key block before position 0 is skipped (`pl.when`) and its index clamped so
that no new block is fetched. Grids ("parallel" except the last one or two axes):

    forward, dq   (B, H, T_pad / bl, R + 1 [+ 1])   query block i, key block i - R + s, or the memory
    dk/dv         (B, K, T_pad / bl, G, R + 1)      key block j, its query heads g, query block j + s
    d(memory)     (B, K, C, G, L / bl)              chunk c's memory, the query blocks of chunk c

A query's mask: keys t - window < t' <= t of its segment (segment ids compared per block pair) and memory
slots with lo <= t - c·L < hi, where [lo, hi) is mem_span with mem_valid folded in ([0, L) for a valid slot
without mem_span, [0, 0) for an invalid or padding slot). Logits, softmax and accumulation are fp32; p is
cast to v's dtype before the p·V matmul, as in jax's TPU flash attention.

`interpret=True` runs the kernels in the TPU interpreter on CPU (`pltpu.InterpretParams`); tests use it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.window_attention.reference import NEG_INF

SUBLANES = 8
f32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_TN = (((0,), (0,)), ((), ()))   # a.T @ b


def block_rows(chunk: int, block: int = 128) -> int:
  """Rows per query / key block: the largest multiple of 8 dividing chunk, at most `block`."""
  if chunk % SUBLANES:
    raise ValueError(f"memory_attention_tpu: chunk={chunk} must be a multiple of {SUBLANES} (TPU sublanes)")
  best = SUBLANES
  for rows in range(SUBLANES, min(chunk, block) + 1, SUBLANES):
    if chunk % rows == 0:
      best = rows
  return best


class _Static(dict):
  """Hashable static configuration of one call (custom_vjp nondiff argument)."""
  def __hash__(self):
    return hash(tuple(sorted(self.items())))


def _band_mask(qi, kb, cfg, seg_q_ref, seg_k_ref):
  """[bl, bl] bool: key block kb visible from query block qi (window, causality, segments)."""
  bl = cfg["bl"]
  q_pos = qi * bl + lax.broadcasted_iota(jnp.int32, (bl, bl), 0)
  k_pos = kb * bl + lax.broadcasted_iota(jnp.int32, (bl, bl), 1)
  mask = k_pos <= q_pos
  if cfg["window"] is not None:
    mask &= k_pos > q_pos - cfg["window"]
  if seg_q_ref is not None:
    mask &= seg_q_ref[...] == seg_k_ref[...]                                 # [bl, 1] == [1, bl]
  return mask


def _mem_mask(qi, cfg, span_ref):
  """[bl, M_pad] bool: memory slots of its chunk visible from query block qi."""
  offset = (qi * cfg["bl"]) % cfg["chunk"] + lax.broadcasted_iota(jnp.int32, (cfg["bl"], 1), 0)
  span = span_ref[...]                                                        # [2, M_pad]
  return (span[0:1] <= offset) & (offset < span[1:2])


def _visit_keys(update, qi, step, cfg, refs):
  """Step `step` of query block qi's key loop (forward and dq): steps 0..band-1 visit the key blocks of its band
  (those before the sequence start are skipped), step `band` its chunk's memory. update(keys, values, mask)."""
  k_ref, v_ref, seg_q, seg_k, mk_ref, mv_ref, span_ref = refs
  band = cfg["band"]
  kb = qi - band + 1 + step

  @pl.when((step < band) & (kb >= 0))
  def _():
    update(k_ref[...], v_ref[...], _band_mask(qi, kb, cfg, seg_q, seg_k))

  if cfg["memory"]:
    @pl.when(step == band)
    def _():
      update(mk_ref[...], mv_ref[...], _mem_mask(qi, cfg, span_ref))


def _refs(refs, cfg):
  """Splits a kernel's refs: (q, k, v, seg_q, seg_k, mem_k, mem_v, span, rest...)."""
  it = iter(refs)
  q, k, v = next(it), next(it), next(it)
  seg_q, seg_k = (next(it), next(it)) if cfg["segments"] else (None, None)
  mk, mv, span = (next(it), next(it), next(it)) if cfg["memory"] else (None, None, None)
  return (q, k, v, seg_q, seg_k, mk, mv, span), list(it)


def _fwd_kernel(*refs, cfg):
  (q_ref, k_ref, v_ref, seg_q, seg_k, mk_ref, mv_ref, span_ref), rest = _refs(refs, cfg)
  o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  qi, step = pl.program_id(2), pl.program_id(3)

  @pl.when(step == 0)
  def _():
    m_scr[...] = jnp.full(m_scr.shape, NEG_INF, f32)
    l_scr[...] = jnp.zeros(l_scr.shape, f32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, f32)

  def update(keys, values, mask):
    s = lax.dot_general(q_ref[...], keys, _NT, preferred_element_type=f32) * cfg["scale"]
    s = jnp.where(mask, s, NEG_INF)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_scr[...] = alpha * acc_scr[...] + jnp.dot(p.astype(values.dtype), values, preferred_element_type=f32)
    m_scr[...] = m_new

  _visit_keys(update, qi, step, cfg, (k_ref, v_ref, seg_q, seg_k, mk_ref, mv_ref, span_ref))

  @pl.when(step == pl.num_programs(3) - 1)
  def _():
    l = l_scr[...]
    o_ref[...] = (acc_scr[...] / l).astype(o_ref.dtype)
    lse_ref[...] = m_scr[...] + jnp.log(l)


def _dq_kernel(*refs, cfg):
  (q_ref, k_ref, v_ref, seg_q, seg_k, mk_ref, mv_ref, span_ref), rest = _refs(refs, cfg)
  do_ref, lse_ref, delta_ref, dq_ref, dq_scr = rest
  qi, step = pl.program_id(2), pl.program_id(3)

  @pl.when(step == 0)
  def _():
    dq_scr[...] = jnp.zeros(dq_scr.shape, f32)

  def update(keys, values, mask):
    s = lax.dot_general(q_ref[...], keys, _NT, preferred_element_type=f32) * cfg["scale"]
    p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
    dp = lax.dot_general(do_ref[...], values, _NT, preferred_element_type=f32)
    ds = p * (dp - delta_ref[...])
    dq_scr[...] += jnp.dot(ds.astype(keys.dtype), keys, preferred_element_type=f32) * cfg["scale"]

  _visit_keys(update, qi, step, cfg, (k_ref, v_ref, seg_q, seg_k, mk_ref, mv_ref, span_ref))

  @pl.when(step == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _kv_grads(q_ref, keys, values, do_ref, lse_ref, delta_ref, mask, scale):
  """(dK, dV) contributions [rows, P] fp32 of one query block to the keys / values it sees under mask."""
  q = q_ref[...]
  s = lax.dot_general(q, keys, _NT, preferred_element_type=f32) * scale      # [bl, rows]
  p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
  do = do_ref[...]
  dv = lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=f32)
  dp = lax.dot_general(do, values, _NT, preferred_element_type=f32)
  ds = p * (dp - delta_ref[...])
  dk = lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=f32) * scale
  return dk, dv


def _dkdv_kernel(*refs, cfg):
  (q_ref, k_ref, v_ref, seg_q, seg_k, _, _, _), rest = _refs(refs, dict(cfg, memory=False))
  do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = rest
  kb, g, step = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  qi = kb + step

  @pl.when((g == 0) & (step == 0))
  def _():
    dk_scr[...] = jnp.zeros(dk_scr.shape, f32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, f32)

  @pl.when(qi < cfg["n_blocks"])
  def _():
    dk, dv = _kv_grads(q_ref, k_ref[...], v_ref[...], do_ref, lse_ref, delta_ref,
                       _band_mask(qi, kb, cfg, seg_q, seg_k), cfg["scale"])
    dk_scr[...] += dk
    dv_scr[...] += dv

  @pl.when((g == pl.num_programs(3) - 1) & (step == pl.num_programs(4) - 1))
  def _():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dmem_kernel(q_ref, mk_ref, mv_ref, span_ref, do_ref, lse_ref, delta_ref, dmk_ref, dmv_ref, dmk_scr, dmv_scr,
                 *, cfg):
  c, g, step = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  qi = c * (cfg["chunk"] // cfg["bl"]) + step

  @pl.when((g == 0) & (step == 0))
  def _():
    dmk_scr[...] = jnp.zeros(dmk_scr.shape, f32)
    dmv_scr[...] = jnp.zeros(dmv_scr.shape, f32)

  dk, dv = _kv_grads(q_ref, mk_ref[...], mv_ref[...], do_ref, lse_ref, delta_ref, _mem_mask(qi, cfg, span_ref),
                     cfg["scale"])
  dmk_scr[...] += dk
  dmv_scr[...] += dv

  @pl.when((g == pl.num_programs(3) - 1) & (step == pl.num_programs(4) - 1))
  def _():
    dmk_ref[...] = dmk_scr[...].astype(dmk_ref.dtype)
    dmv_ref[...] = dmv_scr[...].astype(dmv_ref.dtype)


def _params(n_parallel: int, n_arbitrary: int):
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def _interpret(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _query_side_specs(cfg, kb_of):
  """in_specs of (q, k, v, seg_q, seg_k, mem_k, mem_v, span) over grid (b, h, qi, step)."""
  bl, p, groups = cfg["bl"], cfg["p"], cfg["groups"]
  per_chunk = cfg["chunk"] // bl
  specs = [pl.BlockSpec((None, None, bl, p), lambda b, h, i, s: (b, h, i, 0)),
           pl.BlockSpec((None, None, bl, p), lambda b, h, i, s: (b, h // groups, kb_of(i, s), 0)),
           pl.BlockSpec((None, None, bl, p), lambda b, h, i, s: (b, h // groups, kb_of(i, s), 0))]
  if cfg["segments"]:
    specs += [pl.BlockSpec((None, None, bl, 1), lambda b, h, i, s: (b, i, 0, 0)),
              pl.BlockSpec((None, None, 1, bl), lambda b, h, i, s: (b, kb_of(i, s), 0, 0))]
  if cfg["memory"]:
    m = cfg["m_pad"]
    mem = pl.BlockSpec((None, None, None, m, p), lambda b, h, i, s: (b, h // groups, i // per_chunk, 0, 0))
    specs += [mem, mem, pl.BlockSpec((None, None, 2, m), lambda b, h, i, s: (b, i // per_chunk, 0, 0))]
  return specs


def _inputs(q, k, v, seg_q, seg_k, mk, mv, span, cfg):
  return [q, k, v] + ([seg_q, seg_k] if cfg["segments"] else []) + ([mk, mv, span] if cfg["memory"] else [])


def _grid_q(cfg, b, h):
  return (b, h, cfg["n_blocks"], cfg["band"] + (1 if cfg["memory"] else 0))


def _kb_of(cfg):
  band = cfg["band"]
  return lambda i, s: jnp.clip(i - band + 1 + s, 0, i)    # clamped: a skipped step fetches no new block


def _forward(q, k, v, seg_q, seg_k, mk, mv, span, cfg):
  b, h, t_pad, p = q.shape
  bl = cfg["bl"]
  row = pl.BlockSpec((None, None, bl, p), lambda b_, h_, i, s: (b_, h_, i, 0))
  col = pl.BlockSpec((None, None, bl, 1), lambda b_, h_, i, s: (b_, h_, i, 0))
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t_pad, 1), f32)],
      grid=_grid_q(cfg, b, h), in_specs=_query_side_specs(cfg, _kb_of(cfg)), out_specs=[row, col],
      scratch_shapes=[pltpu.VMEM((bl, 1), f32), pltpu.VMEM((bl, 1), f32), pltpu.VMEM((bl, p), f32)],
      compiler_params=_params(3, 1), interpret=_interpret(cfg["interpret"]),
      name="memory_attention_tpu_fwd")(*_inputs(q, k, v, seg_q, seg_k, mk, mv, span, cfg))
  return o, lse


def _backward(q, k, v, seg_q, seg_k, mk, mv, span, o, lse, do, cfg):
  b, h, t_pad, p = q.shape
  kh = k.shape[1]
  bl, groups, band, nb = cfg["bl"], cfg["groups"], cfg["band"], cfg["n_blocks"]
  delta = jnp.sum(o.astype(f32) * do.astype(f32), axis=-1, keepdims=True)    # [B, H, T_pad, 1]
  interpret = _interpret(cfg["interpret"])
  row_q = pl.BlockSpec((None, None, bl, p), lambda b_, h_, i, s: (b_, h_, i, 0))
  col_q = pl.BlockSpec((None, None, bl, 1), lambda b_, h_, i, s: (b_, h_, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=_grid_q(cfg, b, h), in_specs=_query_side_specs(cfg, _kb_of(cfg)) + [row_q, col_q, col_q],
      out_specs=row_q, scratch_shapes=[pltpu.VMEM((bl, p), f32)], compiler_params=_params(3, 1),
      interpret=interpret, name="memory_attention_tpu_dq")(
          *_inputs(q, k, v, seg_q, seg_k, mk, mv, span, cfg), do, lse, delta)

  # dk/dv: grid (b, kv head, key block j, query head in group g, query block j + s).
  qb = lambda j, s: jnp.minimum(j + s, nb - 1)
  q_row = pl.BlockSpec((None, None, bl, p), lambda b_, c_, j, g, s: (b_, c_ * groups + g, qb(j, s), 0))
  q_col = pl.BlockSpec((None, None, bl, 1), lambda b_, c_, j, g, s: (b_, c_ * groups + g, qb(j, s), 0))
  kv_row = pl.BlockSpec((None, None, bl, p), lambda b_, c_, j, g, s: (b_, c_, j, 0))
  specs = [q_row, kv_row, kv_row]
  args = [q, k, v]
  if cfg["segments"]:
    specs += [pl.BlockSpec((None, None, bl, 1), lambda b_, c_, j, g, s: (b_, qb(j, s), 0, 0)),
              pl.BlockSpec((None, None, 1, bl), lambda b_, c_, j, g, s: (b_, j, 0, 0))]
    args += [seg_q, seg_k]
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(b, kh, nb, groups, band), in_specs=specs + [q_row, q_col, q_col], out_specs=[kv_row, kv_row],
      scratch_shapes=[pltpu.VMEM((bl, p), f32)] * 2, compiler_params=_params(3, 2), interpret=interpret,
      name="memory_attention_tpu_dkdv")(*args, do, lse, delta)
  if not cfg["memory"]:
    return dq, dk, dv, None, None

  # d(memory): grid (b, kv head, chunk c, query head in group g, query block of chunk c).
  per_chunk, m = cfg["chunk"] // bl, cfg["m_pad"]
  n_chunks = mk.shape[2]
  qm = lambda c, s: c * per_chunk + s
  q_row = pl.BlockSpec((None, None, bl, p), lambda b_, k_, c, g, s: (b_, k_ * groups + g, qm(c, s), 0))
  q_col = pl.BlockSpec((None, None, bl, 1), lambda b_, k_, c, g, s: (b_, k_ * groups + g, qm(c, s), 0))
  mem = pl.BlockSpec((None, None, None, m, p), lambda b_, k_, c, g, s: (b_, k_, c, 0, 0))
  span_spec = pl.BlockSpec((None, None, 2, m), lambda b_, k_, c, g, s: (b_, c, 0, 0))
  dmk, dmv = pl.pallas_call(
      functools.partial(_dmem_kernel, cfg=cfg),
      out_shape=[jax.ShapeDtypeStruct(mk.shape, mk.dtype), jax.ShapeDtypeStruct(mv.shape, mv.dtype)],
      grid=(b, kh, n_chunks, groups, per_chunk), in_specs=[q_row, mem, mem, span_spec, q_row, q_col, q_col],
      out_specs=[mem, mem], scratch_shapes=[pltpu.VMEM((m, p), f32)] * 2, compiler_params=_params(3, 2),
      interpret=interpret, name="memory_attention_tpu_dmem")(q, mk, mv, span, do, lse, delta)
  return dq, dk, dv, dmk, dmv


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _attention(q, k, v, seg_q, seg_k, mk, mv, span, cfg):
  return _forward(q, k, v, seg_q, seg_k, mk, mv, span, cfg)[0]


def _attention_fwd(q, k, v, seg_q, seg_k, mk, mv, span, cfg):
  o, lse = _forward(q, k, v, seg_q, seg_k, mk, mv, span, cfg)
  return o, (q, k, v, seg_q, seg_k, mk, mv, span, o, lse)


def _attention_bwd(cfg, res, do):
  q, k, v, seg_q, seg_k, mk, mv, span, o, lse = res
  dq, dk, dv, dmk, dmv = _backward(q, k, v, seg_q, seg_k, mk, mv, span, o, lse, do, cfg)
  return dq, dk, dv, None, None, dmk, dmv, None      # integer inputs: no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)


def memory_attention_tpu(q, k, v, mem_k, mem_v, mem_valid, segment_ids, mem_span, *, window: int | None, chunk: int,
                         scale: float, block: int = 128, interpret: bool = False):
  """The Mosaic-TPU kernels on checked inputs (one device's shard under a mesh); o [B, T, H, P] in q.dtype.
  chunk must be a multiple of 8; block caps the rows of a query / key block."""
  b, t, h, p = q.shape
  kh = k.shape[2]
  bl = block_rows(chunk, block)
  n_chunks = -(-t // chunk)
  t_pad = n_chunks * chunk
  n_blocks = t_pad // bl
  n_mem = 0 if mem_k is None else mem_k.shape[2]
  m_pad = -(-n_mem // SUBLANES) * SUBLANES
  cfg = _Static(bl=bl, p=p, chunk=chunk, window=window, scale=scale, groups=h // kh, n_blocks=n_blocks,
                band=n_blocks if window is None else window // bl + 1, segments=segment_ids is not None,
                memory=n_mem > 0, m_pad=m_pad, interpret=bool(interpret))
  to_heads = lambda x: jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  qh, kh_, vh = to_heads(q), to_heads(k), to_heads(v)
  seg_q = seg_k = mk = mv = span = None
  if segment_ids is not None:   # padding positions: one more segment of their own
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)), constant_values=-1)
    seg = jnp.where(jnp.arange(t_pad) < t, seg, jnp.min(seg) - 1)
    seg_q, seg_k = seg.reshape(b, n_blocks, bl, 1), seg.reshape(b, n_blocks, 1, bl)
  if n_mem:
    pad = ((0, 0), (0, 0), (0, m_pad - n_mem), (0, 0), (0, 0))
    mk, mv = (jnp.pad(x, pad).transpose(0, 3, 1, 2, 4) for x in (mem_k, mem_v))   # [B, K, C, M_pad, P]
    if mem_span is None:
      mem_span = jnp.broadcast_to(jnp.array([0, chunk], jnp.int32)[None, None, :, None], (b, n_chunks, 2, n_mem))
    span = jnp.where(mem_valid[:, :, None, :] != 0, mem_span.astype(jnp.int32), 0)
    span = jnp.pad(span, ((0, 0), (0, 0), (0, 0), (0, m_pad - n_mem)))
  o = _attention(qh, kh_, vh, seg_q, seg_k, mk, mv, span, cfg)
  return o.transpose(0, 2, 1, 3)[:, :t]
