"""Correctness cases of memory attention and the checks that run them: shared by tests/test_window_attention.py
(compiled on a GPU, interpreted on CPU) and benchmarks/speed/window_attention_bench.py (compiled, plus model-sized
cases).

A `Case` is one shape and `BlockSizes`; `make_inputs` draws its inputs, `run_case` returns the relative errors
of o and every gradient against the fp32 reference, and `exact_mask_check` asserts that masked keys and memory
slots get exactly zero gradient. Every case keeps blocks, chunks and head dims >= 16 after padding so that both
modes accept it. CASES and PACKED_CASES run the Triton kernels; MOSAIC_CASES and MOSAIC_PACKED_CASES the Mosaic
GPU ones (compiled, Hopper); MOSAIC_INTERPRET_CASES the Mosaic forward in its interpreter (see
`forward_mosaic.py`: small bands, NPROC=32).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bmojo_jax.pallas_kernels.window_attention import memory_attention
from bmojo_jax.pallas_kernels.window_attention.blocks import BlockSizes
from bmojo_jax.pallas_kernels.window_attention.reference import memory_attention_reference

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  b: int
  t: int
  h: int
  kh: int
  p: int
  window: int | None
  chunk: int
  m: int
  dtype: object
  blocks: BlockSizes
  segments: bool = False   # packed rows: `random_segment_ids`
  span: bool = False       # memory spans: `random_spans`


CASES = (
    # T not a multiple of any block; GQA; window < key block (every block masked); memory with random
    # validity, chunk 0 empty; padding query blocks past the last chunk.
    Case("gqa_mem_ragged", 1, 72, 4, 2, 16, 16, 16, 3, jnp.float32,
         BlockSizes(16, 32, 32, 16, 16, 32, 4, 1, 4, 1)),
    # Full causal, no memory, head_dim 64, batch 2.
    Case("causal_d64", 2, 48, 2, 2, 64, None, 16, 0, jnp.float32,
         BlockSizes(16, 16, 16, 16, 16, 16, 4, 1, 4, 1)),
    # bf16, 4 query heads per kv head, head_dim 64, memory.
    Case("bf16_mqa_mem", 1, 64, 4, 1, 64, 32, 16, 5, jnp.bfloat16,
         BlockSizes(16, 16, 16, 16, 16, 16, 4, 1, 4, 1)),
    # Tiny head dim (12, padded to 16 inside), window spanning 3 chunks, one masked loop per band.
    Case("tiny_head_wide_window", 1, 80, 2, 1, 12, 48, 16, 4, jnp.float32,
         BlockSizes(16, 16, 16, 16, 16, 16, 4, 1, 4, 1, split_masked=False)),
)
MOSAIC_BLOCKS = BlockSizes(16, 16, 16, 16, 16, 16, 4, 1, 4, 1, forward_impl="mosaic")
MOSAIC_CASES = (
    # The Mosaic GPU forward (forward_mosaic.py) and, through "auto", the Mosaic dq and dk/dv kernels
    # (dq_mosaic.py, dkdv_mosaic.py); the memory's dk/dv stay Triton. T ragged (padded to 256: two CTAs
    # of 2 x 64 rows), GQA, window < key tile of 128, so every key tile of the first CTA is masked.
    Case("mosaic_gqa_window", 1, 200, 2, 1, 64, 96, 32, 0, jnp.bfloat16, MOSAIC_BLOCKS),
    # Memory (M = 20, padded to 64 slots) read once per CTA, random validity, chunk 0 empty.
    Case("mosaic_mem", 1, 256, 1, 1, 64, 128, 128, 20, jnp.bfloat16, MOSAIC_BLOCKS),
    # Full causal, head_dim 128; the dq kernel's key tile 128 (the default is 64).
    Case("mosaic_causal_d128", 1, 256, 2, 2, 128, None, 64, 0, jnp.bfloat16,
         dataclasses.replace(MOSAIC_BLOCKS, block_k_dq_mosaic=128)),
    # Memory at head_dim 128, GQA, window across chunks.
    Case("mosaic_mem_d128", 1, 512, 4, 2, 128, 256, 128, 40, jnp.bfloat16,
         dataclasses.replace(MOSAIC_BLOCKS, dq_impl="mosaic")),
)
BLOCKS16 = BlockSizes(16, 16, 16, 16, 16, 16, 4, 1, 4, 1)
PACKED_CASES = (
    # Documents of random lengths (some of one token, many shorter than a chunk, starting mid-chunk); row 0
    # ends in a padding-like segment, row 1 is one document. T ragged, GQA, window < key block, memory with
    # random validity and spans (empty, part of the chunk, the whole chunk).
    Case("packed_gqa_mem_span", 2, 72, 4, 2, 16, 32, 16, 3, jnp.float32,
         BlockSizes(16, 32, 32, 16, 16, 32, 4, 1, 4, 1), segments=True, span=True),
    # Full causal, packed, no memory: documents longer than a block take the unmasked run.
    Case("packed_causal", 2, 88, 2, 1, 16, None, 16, 0, jnp.float32, BLOCKS16, segments=True),
    # bf16, packed, memory without spans (whole chunks), window across chunks, one masked loop per band.
    Case("packed_bf16_mem", 1, 80, 2, 1, 32, 48, 16, 4, jnp.bfloat16,
         dataclasses.replace(BLOCKS16, split_masked=False), segments=True),
    # Spans without segments.
    Case("span_only", 1, 64, 2, 2, 16, 32, 16, 5, jnp.float32, BLOCKS16, span=True),
)
MOSAIC_PACKED_CASES = (
    # The three Mosaic kernels with packed rows: T ragged (two CTAs), GQA, window < key tile.
    Case("mosaic_packed_window", 2, 200, 2, 1, 64, 96, 32, 0, jnp.bfloat16, MOSAIC_BLOCKS, segments=True),
    # Packed with memory spans, head_dim 128, GQA, window across chunks, the Mosaic dq with memory.
    Case("mosaic_packed_mem_span", 1, 512, 4, 2, 128, 256, 128, 40, jnp.bfloat16,
         dataclasses.replace(MOSAIC_BLOCKS, dq_impl="mosaic"), segments=True, span=True),
    # Full causal, packed, the dq kernel's key tile 128.
    Case("mosaic_packed_causal", 2, 256, 2, 2, 64, None, 64, 0, jnp.bfloat16,
         dataclasses.replace(MOSAIC_BLOCKS, block_k_dq_mosaic=128), segments=True),
    # Spans without segments.
    Case("mosaic_span_mem", 1, 256, 1, 1, 64, 128, 128, 20, jnp.bfloat16, MOSAIC_BLOCKS, span=True),
)
# The Mosaic forward (the backward in Triton) through the interpreter, in a subprocess with NPROC=32 (see
# `test_mosaic_forward_interpreted`): bands of at most num_stages_mosaic key tiles per CTA, since the
# interpreter refuses a producer that does not wait for its slots' last releases.
MOSAIC_FWD_BLOCKS = dataclasses.replace(MOSAIC_BLOCKS, dq_impl="triton", dkdv_impl="triton")
MOSAIC_INTERPRET_CASES = (
    Case("mosaic_interpret_packed_mem_span", 1, 256, 1, 1, 64, 128, 128, 20, jnp.bfloat16, MOSAIC_FWD_BLOCKS,
         segments=True, span=True),
)


def random_segment_ids(rng, b: int, t: int, chunk: int):
  """[B, T] int32 packed rows: documents of random lengths (half shorter than a chunk, one of a single token,
  so most start mid-chunk), each a contiguous run of its own id; row 0 ends in a padding-like segment (id -1)
  and row 1 is one document."""
  rows = []
  for bi in range(b):
    if bi == 1:
      rows.append(np.full(t, 5))
      continue
    lengths = [int(rng.integers(1, chunk)), 1]
    while sum(lengths) < t:
      lengths.append(int(rng.integers(1, chunk) if rng.random() < 0.5 else rng.integers(chunk, 4 * chunk)))
    ids = np.repeat(3 * np.arange(len(lengths)) + 1, lengths)[:t]
    ids[t - max(2, t // 8):] = -1
    rows.append(ids)
  return np.stack(rows).astype(np.int32)


def random_spans(rng, b: int, c: int, m: int, chunk: int):
  """[B, C, 2, M] int32 memory spans: random [lo, hi) within the chunk, a fifth the whole chunk, a fifth empty."""
  lo, hi = np.sort(rng.integers(0, chunk + 1, (2, b, c, m)), axis=0)
  pick = rng.random((b, c, m))
  lo, hi = np.where(pick < 0.2, 0, lo), np.where(pick < 0.2, chunk, hi)
  hi = np.where(pick > 0.8, lo, hi)
  return np.stack([lo, hi], axis=2).astype(np.int32)


def make_inputs(case: Case, seed: int = 0):
  """(q, k, v, mem_k, mem_v, mem_valid, segment_ids, mem_span) (absent ones None) and a key for the cotangent."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  rng = np.random.default_rng(seed)
  q = jax.random.normal(ks[0], (case.b, case.t, case.h, case.p), case.dtype)
  k = jax.random.normal(ks[1], (case.b, case.t, case.kh, case.p), case.dtype)
  v = jax.random.normal(ks[2], (case.b, case.t, case.kh, case.p), case.dtype)
  seg = jnp.asarray(random_segment_ids(rng, case.b, case.t, case.chunk)) if case.segments else None
  if not case.m:
    return (q, k, v, None, None, None, seg, None), ks[6]
  c = -(-case.t // case.chunk)
  mem_k = jax.random.normal(ks[3], (case.b, c, case.m, case.kh, case.p), case.dtype)
  mem_v = jax.random.normal(ks[4], (case.b, c, case.m, case.kh, case.p), case.dtype)
  mem_valid = jax.random.bernoulli(ks[5], 0.6, (case.b, c, case.m)).at[:, 0].set(False)
  span = jnp.asarray(random_spans(rng, case.b, c, case.m, case.chunk)) if case.span else None
  return (q, k, v, mem_k, mem_v, mem_valid, seg, span), ks[6]


@functools.lru_cache(maxsize=None)
def value_and_vjp(case: Case, use_kernel: bool, interpret: bool):
  """jit(inputs, cotangent) -> (o, grads of q, k, v[, mem_k, mem_v]); one compile per case."""
  if use_kernel:
    attn = functools.partial(memory_attention, window=case.window, chunk=case.chunk,
                             block_sizes=case.blocks, interpret=interpret)
  else:
    attn = functools.partial(memory_attention_reference, window=case.window, chunk=case.chunk)

  @jax.jit
  def fn(inputs, ct):
    q, k, v, mem_k, mem_v, mem_valid, seg, span = inputs
    if mem_k is None:
      o, pull = jax.vjp(lambda q, k, v: attn(q, k, v, segment_ids=seg), q, k, v)
    else:
      o, pull = jax.vjp(lambda q, k, v, mk, mv: attn(q, k, v, mk, mv, mem_valid, segment_ids=seg, mem_span=span),
                        q, k, v, mem_k, mem_v)
    return o, pull(ct.astype(o.dtype))

  return fn


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_case(case: Case, interpret: bool, seed: int = 0) -> dict[str, float]:
  """Relative errors of o and each gradient: kernel (inputs in case.dtype) vs the fp32 reference."""
  inputs, key = make_inputs(case, seed)
  ct = jax.random.normal(key, (case.b, case.t, case.h, case.p), jnp.float32)
  o, grads = value_and_vjp(case, True, interpret)(inputs, ct)
  up = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, inputs)
  with jax.default_matmul_precision("highest"):   # the fp32 reference stays fp32 (no tf32) on a GPU
    o_ref, grads_ref = value_and_vjp(case, False, False)(up, ct)
  assert o.dtype == case.dtype and o.shape == o_ref.shape
  names = ("o", "dq", "dk", "dv", "dmem_k", "dmem_v")
  errs = [rel_err(o, o_ref)] + [rel_err(g, r) for g, r in zip(grads, grads_ref)]
  return dict(zip(names, errs))


def exact_mask_check(case: Case, interpret: bool) -> None:
  """Cotangent on the last query only: every key outside its window (and its segment), and the memory of
  every other chunk (and its invalid slots, and those whose span leaves the query out), must get exactly zero
  gradient."""
  inputs, key = make_inputs(case)
  t_last = case.t - 1
  ct = jnp.zeros((case.b, case.t, case.h, case.p)).at[:, t_last].set(
      jax.random.normal(key, (case.b, case.h, case.p)))
  _, grads = value_and_vjp(case, True, interpret)(inputs, ct)
  dk, dv = np.asarray(grads[1], np.float32), np.asarray(grads[2], np.float32)
  seg = None if inputs[6] is None else np.asarray(inputs[6])
  for bi in range(case.b):
    first_seen = 0 if case.window is None else t_last - case.window + 1
    if seg is not None:   # the first position of the last query's segment
      first_seen = max(first_seen, int(np.flatnonzero(seg[bi] == seg[bi, t_last])[0]))
    assert not np.any(dk[bi, :first_seen]) and not np.any(dv[bi, :first_seen])
    assert np.all(np.any(dv[bi, first_seen:] != 0, axis=(1, 2)))   # the window itself does get gradient
  assert not np.any(np.asarray(grads[0], np.float32)[:, :t_last])
  if case.m:
    c_last = t_last // case.chunk
    seen = np.asarray(inputs[5]).copy()
    seen[:, :c_last] = seen[:, c_last + 1:] = False
    if inputs[7] is not None:
      span, offset = np.asarray(inputs[7])[:, c_last], t_last - c_last * case.chunk
      seen[:, c_last] &= (span[:, 0] <= offset) & (offset < span[:, 1])
    for g in (np.asarray(grads[3], np.float32), np.asarray(grads[4], np.float32)):
      assert not np.any(g[~seen])
      assert np.all(np.any(g[:, c_last] != 0, axis=(2, 3)) == seen[:, c_last])
