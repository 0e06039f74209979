"""The Mosaic-TPU memory attention's kernel bodies: forward, dq, dk/dv and d(memory), with the masks they share
(band: window, causality, segments; memory: each slot's span) and the walk over a query block's key blocks. The
layout, grids and the custom VJP that calls them are tpu.py's (its docstring describes both)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from bmojo_jax.pallas_kernels.window_attention.reference import NEG_INF

SUBLANES = 8
f32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_TN = (((0,), (0,)), ((), ()))   # a.T @ b


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


def fwd_kernel(*refs, cfg):
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


def dq_kernel(*refs, cfg):
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


def dkdv_kernel(*refs, cfg):
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


def dmem_kernel(q_ref, mk_ref, mv_ref, span_ref, do_ref, lse_ref, delta_ref, dmk_ref, dmv_ref, dmk_scr, dmv_scr,
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
