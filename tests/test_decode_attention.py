"""The decode-step attention kernel (pallas_kernels/decode_attention; Pallas' interpreter on a CPU, compiled on a
GPU) = its jnp reference, and a model decoding through it = the parallel forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bmojo_jax import LanguageModel
from bmojo_jax.config import ComputeConfig, ConfigError, DecodeAttnImpl
from bmojo_jax.inference import Decoder
from bmojo_jax import kernels
from bmojo_jax.kernels import get_decode_attention_fn, resolve_decode_attn_impl
from bmojo_jax.memory.store import NO_POS
from bmojo_jax.pallas_kernels.decode_attention import (BlockSizes, decode_step_attention,
                                                       decode_step_attention_reference)
from bmojo_jax.pallas_kernels.decode_attention.kernel import Layout, next_pow2
from tests.conftest import host_normal, host_tokens, tiny_config


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  b: int
  h: int
  k: int            # kv heads (G = h // k)
  p: int
  s: int            # ring slots
  t: int            # the query's position (already written into slot t mod s)
  window: int | None
  m_f: int = 0      # fading tokens (0: none)
  m_e: int = 0      # store entries (0: none)
  chunk: int = 4
  block_k: int = 4
  min_programs: int = 64
  dot: bool = False  # BlockSizes.dot: the products as tensor-core dots (here G = 1 only)

  def blocks(self) -> BlockSizes:
    return BlockSizes(block_k=self.block_k, min_programs=self.min_programs, dot=self.dot)

  def layout(self) -> Layout:
    return Layout.of(self.blocks(), self.b, self.k, self.s, next_pow2(self.h // self.k), self.p,
                     interpret=jax.default_backend() != "gpu")            # as `run` launches it


CASES = [
    # ring only (Transformer: no window), S not a power of 2, t < S: most of the ring still empty
    Case("ring_partly_empty", b=2, h=2, k=2, p=8, s=13, t=4, window=None),
    # ring only, wrapped many times, window < S (Hybrid), G = 2
    Case("ring_window_gqa2", b=2, h=4, k=2, p=8, s=12, t=53, window=8),
    # ring + fading (B'MOJO-F), G = 1, t >= chunk, M_f not a power of 2
    Case("ring_fading", b=2, h=2, k=2, p=8, s=10, t=27, window=8, m_f=3),
    # ring + fading before the first chunk ends (fading hidden): only the ring counts
    Case("ring_fading_chunk0", b=1, h=4, k=2, p=8, s=8, t=2, window=8, m_f=2),
    # ring + fading + store (B'MOJO), G = 2, window < S, M_e with empty slots (one row all empty)
    Case("ring_fading_store_gqa2", b=3, h=4, k=2, p=8, s=12, t=37, window=8, m_f=2, m_e=5),
    # ring + fading + store, G = 1, t < S, one split (block_k covers the ring)
    Case("ring_fading_store_one_split", b=2, h=2, k=2, p=16, s=12, t=9, window=12, m_f=4, m_e=4, block_k=16,
         min_programs=1),
    # G = 3 (query heads padded to 4 in the kernel), ring + store without fading
    Case("ring_store_gqa3", b=1, h=6, k=2, p=8, s=9, t=20, window=None, m_e=3),
]
# The dot form of the products (G = 1; P and block_k 16, so a GPU launch takes it too): split and partly empty,
# wrapped with fading and store parts of fewer than 16 rows (padded to 16 for the dot, masked), one split
DOT_CASES = [
    Case("dot_ring_partly_empty", b=2, h=2, k=2, p=16, s=53, t=20, window=None, block_k=16, dot=True),
    Case("dot_ring_fading_store", b=2, h=2, k=2, p=16, s=40, t=97, window=32, m_f=3, m_e=5, chunk=16, block_k=16,
         dot=True),
    Case("dot_one_split", b=2, h=2, k=2, p=16, s=12, t=9, window=12, m_f=4, m_e=4, block_k=16, min_programs=1,
         dot=True),
]


def inputs(case: Case, dtype):
  """(q, ring_k, ring_v, t, kwargs) from host numpy; the store's positions (NO_POS: empty) leave row 0 partly empty
  and the last row all empty."""
  kv = lambda seed, n: jnp.asarray(host_normal(seed, (case.b, n, case.k, case.p)), dtype)
  q = jnp.asarray(host_normal(0, (case.b, case.h, case.p)) * 2, dtype)
  kw = dict(window=case.window, chunk=case.chunk)
  if case.m_f:
    kw["fading"] = (kv(3, case.m_f), kv(4, case.m_f))
  if case.m_e:
    valid = np.random.default_rng(5).random((case.b, case.m_e)) < 0.6
    valid[0, 0], valid[0, -1], valid[-1] = True, False, False
    pos = np.where(valid, np.arange(case.m_e), NO_POS)
    kw["store"] = (kv(6, case.m_e), kv(7, case.m_e), jnp.asarray(pos, jnp.int32))
  return q, kv(1, case.s), kv(2, case.s), jnp.asarray(case.t, jnp.int32), kw


def run(case: Case, dtype):
  """(kernel, reference in dtype, reference in fp32 of the same rounded inputs), each one compile."""
  q, rk, rv, t, kw = inputs(case, dtype)
  kernel = jax.jit(lambda *a: decode_step_attention(*a, block_sizes=case.blocks(), interpret=None, **kw))
  ref = jax.jit(lambda *a: decode_step_attention_reference(*a, **kw))
  up = lambda x: jax.tree.map(lambda y: y.astype(jnp.float32) if getattr(y, "dtype", None) == dtype else y, x)
  kw32 = up(kw)
  ref32 = jax.jit(lambda *a: decode_step_attention_reference(*a, **kw32))
  out = [np.asarray(f(*args), np.float32) for f, args in
         ((kernel, (q, rk, rv, t)), (ref, (q, rk, rv, t)), (ref32, (*up((q, rk, rv)), t)))]
  return out


@pytest.mark.parametrize("case", CASES + DOT_CASES, ids=lambda c: c.name)
def test_kernel_matches_reference_fp32(case):
  kernel, ref, _ = run(case, jnp.float32)
  assert np.abs(ref).max() > 0.1                                  # not a zero output
  np.testing.assert_allclose(kernel, ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("case", [CASES[1], CASES[4], DOT_CASES[-1]], ids=lambda c: c.name)
def test_kernel_matches_reference_bf16(case):
  """bf16 inputs: the kernel is as close to the fp32 softmax of the same inputs as the bf16 reference is (both round
  the output to bf16; the reference also its probabilities)."""
  kernel, ref, ref32 = run(case, jnp.bfloat16)
  ref_err = np.abs(ref - ref32).max()
  assert np.abs(kernel - ref32).max() <= 2 * ref_err + 1e-3, (np.abs(kernel - ref32).max(), ref_err)


def test_cases_cover_several_splits_and_one():
  """The ring is split over several programs (and loops over several blocks in one) where the cases say so; the
  dot cases run the dot form (16 rows) in several splits and in one, and the others do not."""
  layouts = {c.name: c.layout() for c in CASES + DOT_CASES}
  assert all(layouts[c.name].dot_rows == 16 for c in DOT_CASES) and not any(layouts[c.name].dot_rows for c in CASES)
  assert layouts["dot_ring_partly_empty"].n_splits > 1 and layouts["dot_ring_fading_store"].n_splits > 1
  assert layouts["dot_one_split"].n_splits == 1
  assert layouts["ring_partly_empty"].n_splits > 1 and layouts["ring_window_gqa2"].n_splits > 1
  assert layouts["ring_fading_store_one_split"].n_splits == 1
  assert Layout.of(BlockSizes(block_k=4, min_programs=8), 1, 2, 40, 1, 8, interpret=True).blocks_per_split > 1


def test_layout_spreads_a_long_ring_and_keeps_a_large_batch_whole():
  """Batch 1, 32k ring, 32 kv heads: >= min_programs programs; batch 64 at S 512: one split per (row, kv head)."""
  long = Layout.of(BlockSizes(), 1, 32, 32768, 1, 64, interpret=False)
  assert 32 * long.n_splits >= 512 and long.n_splits * long.blocks_per_split * long.block_k >= 32768
  assert Layout.of(BlockSizes(), 64, 32, 512, 1, 64, interpret=False).n_splits == 1
  odd = Layout.of(BlockSizes(), 1, 4, 1000, 1, 64, interpret=False)   # S not a multiple of block_k: masked
  assert odd.n_splits * odd.blocks_per_split * odd.block_k >= 1000
  assert (odd.n_splits - 1) * odd.blocks_per_split * odd.block_k < 1000   # no split starts past the ring


@pytest.mark.parametrize("b, s, m_f, m_e, window, dot", [(1, 512, 16, 64, 512, False), (64, 512, 16, 64, 512, False),
                                                         (1, 1000, 0, 0, None, False), (64, 512, 16, 64, 512, True),
                                                         (1, 1000, 0, 0, None, True), (8, 256, 4, 8, 128, True)])
def test_kernel_lowers_for_gpu(b, s, m_f, m_e, window, dot):
  """The compiled kernel (not the interpreter) lowers to Triton for a GPU, on a CPU too, at the 1.4B B'MOJO shapes
  and a Transformer ring of a size that is no power of two: every in-kernel array a power of two, every primitive
  one the Triton lowering knows, in both forms of the products; the store's positions passed straight to it.
  (Triton's own compile to PTX happens on the GPU: the bench checks it.)"""
  sds = jax.ShapeDtypeStruct
  rows = lambda n: sds((b, n, 32, 64), jnp.bfloat16)
  fading = (rows(m_f), rows(m_f)) if m_f else None
  store = (rows(m_e), rows(m_e), sds((b, m_e), jnp.int32)) if m_e else None
  fn = lambda q, rk, rv, t, fading, store: decode_step_attention(q, rk, rv, t, window=window, chunk=512, fading=fading,
                                                                 store=store, interpret=False,
                                                                 block_sizes=BlockSizes(dot=dot))
  text = jax.jit(fn).trace(sds((b, 32, 64), jnp.bfloat16), rows(s), rows(s), sds((), jnp.int32), fading,
                           store).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("triton") >= 1 and "decode_attention" in text
  assert Layout.of(BlockSizes(dot=dot), b, 32, s, 1, 64, interpret=False).dot_rows == (16 if dot else 0)
  if m_e:       # the store's positions reach the kernel as the cache holds them: no XLA op a token converts them
    call = next(line for line in text.splitlines() if "custom_call" in line and "triton" in line)
    assert f"%arg{8 if m_f else 6})" in call, call[:200]


@pytest.mark.parametrize("bad, match", [
    (dict(q=(2, 3, 8)), "query heads 3 must be a multiple of kv heads 2"),
    (dict(ring=(2, 12, 2, 4)), r"must be \[B, S, K, P\] matching q"),
    (dict(t=(1,)), "t must be a scalar position"),
    (dict(fading_without_chunk=True), "fading tokens need a positive chunk"),
    (dict(store_pos=(2, 3)), r"store pos \(2, 3\) int32 must be \[B, M_e\]"),
    (dict(store_pos=(2, 4), dtype=bool), r"store pos \(2, 4\) bool must be \[B, M_e\] = \(2, 4\) int32"),
])
def test_bad_inputs_are_refused(bad, match):
  q = jnp.zeros(bad.get("q", (2, 4, 8)))
  ring = jnp.zeros(bad.get("ring", (2, 12, 2, 8)))
  t = jnp.zeros(bad.get("t", ()), jnp.int32)
  kw = {}
  if "fading_without_chunk" in bad:
    kw["fading"] = (jnp.zeros((2, 2, 2, 8)),) * 2
  if "store_pos" in bad:
    pos = jnp.zeros(bad["store_pos"], bad.get("dtype", jnp.int32))
    kw["store"] = (jnp.zeros((2, 4, 2, 8)), jnp.zeros((2, 4, 2, 8)), pos)
  with pytest.raises(ValueError, match=match):
    decode_step_attention(q, ring, ring, t, window=None, interpret=True, **kw)


def test_decode_attention_fn_follows_decode_attn_impl():
  """reference -> the jnp form; pallas -> the kernel (interpret mode on the CPU); auto -> the reference on CPU and
  TPU, the choice by the ring's shape on a GPU; no TPU kernel; an unknown name is a ConfigError naming the field."""
  assert get_decode_attention_fn("reference") is decode_step_attention_reference
  assert get_decode_attention_fn("pallas") is decode_step_attention
  on_gpu = jax.default_backend() == "gpu"
  assert get_decode_attention_fn("auto") is (kernels.decode_step_attention_by_shape if on_gpu else
                                             decode_step_attention_reference)
  for backend in ("tpu", "cpu"):
    assert resolve_decode_attn_impl("auto", backend) == DecodeAttnImpl.REFERENCE
  assert resolve_decode_attn_impl("auto", "gpu") == DecodeAttnImpl.AUTO
  assert resolve_decode_attn_impl("pallas", "gpu") == DecodeAttnImpl.PALLAS
  with pytest.raises(ConfigError, match="decode_attn_impl='pallas' needs a GPU or CPU"):
    resolve_decode_attn_impl("pallas", "tpu")
  with pytest.raises(ConfigError, match="compute.decode_attn_impl='cudnn'"):
    ComputeConfig(decode_attn_impl="cudnn")


def test_auto_on_gpu_takes_the_kernel_for_a_small_ring_or_an_unsplit_dot_launch(monkeypatch):
  """`decode_step_attention_by_shape` (auto on a GPU) calls the kernel while the ring's K and V fit
  DECODE_KERNEL_MAX_RING_BYTES; past it the reference, unless batch · kv heads gives each (row, kv head) one program
  (BlockSizes().min_programs) and the launch takes the dot form (one query head per kv head, P >= 16); the
  arguments passed on as they came."""
  calls = []
  monkeypatch.setattr(kernels, "decode_step_attention", lambda *a, **kw: calls.append(("pallas", a, kw)))
  monkeypatch.setattr(kernels, "decode_step_attention_reference", lambda *a, **kw: calls.append(("reference", a, kw)))
  t, p = jnp.int32(3), 16
  fits = lambda batch, heads: kernels.DECODE_KERNEL_MAX_RING_BYTES // (2 * batch * heads * p * 2)  # rows at the limit
  wide = BlockSizes().min_programs // 2                                  # batch 2 x this many kv heads: unsplit
  for batch, heads, group, rows, want in ((1, 2, 1, fits(1, 2), "pallas"),
                                          (1, 2, 1, fits(1, 2) + 1, "reference"),
                                          (2, wide - 1, 1, 2 * fits(2, wide - 1), "reference"),     # split
                                          (2, wide, 1, 2 * fits(2, wide), "pallas"),               # unsplit, dot
                                          (2, wide, 2, 2 * fits(2, wide), "reference")):           # unsplit, G 2: sums
    q = jnp.zeros((batch, heads * group, p), jnp.bfloat16)
    ring = jax.ShapeDtypeStruct((batch, rows, heads, p), jnp.bfloat16)
    kernels.decode_step_attention_by_shape(q, ring, ring, t, window=None)
    assert calls[-1] == (want, (q, ring, ring, t), {"window": None}), (batch, heads, group, rows)


T = 19   # > 4 chunks of 4 and past the window (8): the ring wraps, the fading tokens and the store fill


@pytest.mark.parametrize("family", ["bmojo", "transformer", pytest.param("hybrid", marks=pytest.mark.slow),
                                    pytest.param("bmojo_f", marks=pytest.mark.slow)])
def test_pallas_decode_matches_parallel_forward(family):
  """A model decoding through the kernels (decode_attn_impl='pallas': the attention and the cache update,
  interpret mode) gives the logits of the parallel pass of the same weights, from a prompt ending mid-chunk."""
  make = lambda impl: LanguageModel(tiny_config(family, init_std=0.1, compute=dict(
      attn_impl="reference", decode_attn_impl=impl)), rngs=nnx.Rngs(0))
  reference, model = make("reference"), make("pallas")
  tokens = host_tokens(1, (2, T))
  full = np.asarray(nnx.jit(lambda m, x: m(x))(reference, tokens))
  decoder = Decoder(model)
  _, cache = decoder.prefill(tokens[:, :5], T)
  worst = 0.0
  for t in range(5, T):
    logits, cache = decoder.step(tokens[:, t], cache)
    worst = max(worst, float(np.abs(np.asarray(logits) - full[:, t]).max()))
  assert worst <= 1e-4, worst
  assert float(np.abs(full).max()) > 0.5


def test_bench_tiny_writes_records(tmp_path):
  """benchmarks/speed/decode_attention_bench.py --tiny (interpret mode): a record per shape and implementation, the
  kernel as close to the fp32 reference as the bf16 reference is."""
  import json
  from benchmarks.speed import decode_attention_bench
  records = decode_attention_bench.main(["--tiny", "--out", str(tmp_path)])
  assert json.load(open(next(tmp_path.glob("decode_attention_*.json")))) == records
  assert {(r["shape"], r["impl"]) for r in records} == {(s.name, i) for s in decode_attention_bench.TINY
                                                        for i in ("pallas", "pallas_sum", "reference")}
  assert not [r for r in records if "error" in r]
  for shape in decode_attention_bench.TINY:
    err = {r["impl"]: r["max_err_vs_fp32"] for r in records if r["shape"] == shape.name}
    assert max(err["pallas"], err["pallas_sum"]) <= 2 * err["reference"] + 1e-3, err
    assert all(r["us_per_layer"] > 0 for r in records)
