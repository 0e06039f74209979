"""Pallas selective scan vs the sequential reference: forward and every gradient, also with packed documents
(`reset`), and the reference itself against running each packed document alone.

`TestSelectiveScan` runs the kernels compiled (GPU: `python -m pytest tests/test_selective_scan.py` on a GPU
machine); `TestSelectiveScanInterpret` reruns the same cases in Pallas' interpreter, which is what CI (CPU)
exercises. Shapes are tiny so the interpreter finishes quickly; the tolerances are the issue's
(rel err ||a - b|| / ||b||: fp32 <= 1e-4, bf16 <= 2e-2).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmojo_jax.pallas_kernels.selective_scan import selective_scan
from bmojo_jax.pallas_kernels.selective_scan.block_sizes import BlockSizes
from bmojo_jax.pallas_kernels.selective_scan.ops import _plan
from bmojo_jax.pallas_kernels.selective_scan.reference import selective_scan_reference
from bmojo_jax.pallas_kernels.selective_scan.segments import (carry_adjoints, carry_reference, carry_states,
                                                   segment_resets)
from tests.conftest import host_normal

# Small chunks keep the unrolled kernels cheap to trace in the interpreter and still give several chunks,
# a partial last chunk (odd T), several channel blocks and several time segments (T=37: 3 segments of 16).
# SMALL_BLOCKS also takes the non-default paths: [block_e, N] tiles (N on lanes) and hand prefetch in both
# directions; the defaults (channels on lanes, no prefetch) are the *_lanes_e cases and NO_PREFETCH.
SMALL_BLOCKS = BlockSizes(block_e=8, chunk=8, chunk_bwd=4, block_e_bwd=4, segment_len=16, prefetch=True,
                          prefetch_bwd=True, channels_on_lanes=False, channels_on_lanes_bwd=False)
NO_PREFETCH = BlockSizes(block_e=8, chunk=8, chunk_bwd=4, block_e_bwd=8, prefetch=False, prefetch_bwd=False,
                         segment_len=0)
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
NAMES = ("u", "delta", "A", "Bm", "Cm", "D", "z", "delta_bias", "h0")

CASES = [
    # odd T (37 = 4 chunks of 8 + 5), D, z, bias, initial state, shared B/C
    dict(id="fp32_full", dtype=jnp.float32, B=2, T=37, E=16, N=8, G=0, D=True, z=True, bias=True, h0=True),
    # grouped B/C, N not a power of two, no optional inputs, no softplus
    dict(id="fp32_grouped_bare", dtype=jnp.float32, B=1, T=13, E=16, N=6, G=2, D=False, z=False, bias=False,
         h0=False, softplus=False, blocks=NO_PREFETCH),
    # dt near 0 (softplus(-12) ~ 6e-6) and large (softplus(6) ~ 6) mixed per token and channel
    dict(id="fp32_dt_extremes", dtype=jnp.float32, B=1, T=21, E=8, N=16, G=0, D=True, z=True, bias=False,
         h0=True, dt="extreme"),
    # one program per sequence (no time segments), no initial state
    dict(id="fp32_one_segment", dtype=jnp.float32, B=2, T=37, E=16, N=8, G=0, D=True, z=True, bias=True,
         h0=False, blocks=BlockSizes(block_e=8, chunk=8, chunk_bwd=4, block_e_bwd=4, segment_len=0)),
    dict(id="bf16_full", dtype=jnp.bfloat16, B=1, T=30, E=32, N=16, G=4, D=True, z=True, bias=True, h0=True),
    # channels on lanes ([N, block_e] tiles) in every kernel
    dict(id="fp32_lanes_e", dtype=jnp.float32, B=2, T=37, E=64, N=16, G=0, D=True, z=True, bias=True, h0=True,
         blocks=BlockSizes(block_e=32, chunk=8, chunk_bwd=4, block_e_bwd=16, channels_on_lanes=True,
                           channels_on_lanes_bwd=True, segment_len=16)),
    dict(id="bf16_lanes_e_grouped", dtype=jnp.bfloat16, B=1, T=30, E=64, N=16, G=2, D=True, z=True, bias=True,
         h0=False, blocks=BlockSizes(block_e=32, chunk=8, chunk_bwd=8, block_e_bwd=32, channels_on_lanes=True,
                                     channels_on_lanes_bwd=True, segment_len=0)),
    # dt near 0 and large mixed: the backward's h_{t-1} exp(dt A), taken as h_t - (dt u) B, where the two terms
    # differ by orders of magnitude
    dict(id="fp32_extreme_dt", dtype=jnp.float32, B=2, T=37, E=64, N=16, G=0, D=True, z=True, bias=True, h0=True,
         dt="extreme", blocks=BlockSizes(block_e=32, chunk=8, chunk_bwd=4, block_e_bwd=16, segment_len=16)),
]


# Packed documents (issue 14): one batch row per layout, each listing the tokens that start a document. T = 37
# cut as SMALL_BLOCKS cuts it: chunks of 8 (0, 8, ..., 32), saves every 4, time segments starting at 0, 16, 32.
RESET_T = 37
RESET_LAYOUTS = {
    "short_docs": [0, 3, 5, 6, 10, 13, 19, 23, 26, 31, 36],  # shorter than a chunk, several per chunk; t = 0
                                                              # drops a nonzero h0; a reset at the last token
    "segment_edges": [8, 15, 16, 31, 32],                    # a chunk's first token, the last and first tokens
                                                              # of time segments
    "mid_chunk": [21],                                        # h0's document, then one from mid-chunk
    "random": None,                                           # Bernoulli(0.2) per token, fixed seed
    "one_doc": [],                                            # reset given but never set: continues h0
    "t0_only": [0],                                           # a row that is one document, dropping h0
}
RESET_CASES = [
    # N on lanes, hand prefetch, 3 time segments
    dict(id="segments_prefetch", G=0, blocks=SMALL_BLOCKS),
    # the defaults' paths (channels on lanes, no prefetch), 3 time segments, chunks of 4 and sub-chunks of 2,
    # grouped B/C
    dict(id="segments_lanes_e_grouped", G=2,
         blocks=BlockSizes(block_e=32, chunk=4, chunk_bwd=2, block_e_bwd=16, segment_len=16)),
    # one program per row (no segment pass, no carry)
    dict(id="one_segment", G=0, blocks=NO_PREFETCH),
]


def tiered(cases, fast):
  """pytest params of cases (dicts with an id): those named in `fast` in the inner loop (`-m "not slow"`), the
  others marked slow (CI runs every one)."""
  return [pytest.param(c, id=c["id"], marks=() if c["id"] in fast else pytest.mark.slow) for c in cases]


def make_reset(layouts, t, seed=0):
  """[len(layouts), t] bool: row i is True where layout i starts a document (None: random)."""
  rows = []
  for i, starts in enumerate(layouts):
    if starts is None:
      rows.append(np.asarray(jax.random.bernoulli(jax.random.PRNGKey(seed + i), 0.2, (t,))))
    else:
      rows.append(np.isin(np.arange(t), starts))
  return jnp.asarray(np.stack(rows))


def doc_bounds(reset_row):
  """[(start, end)] of the documents of one row (a reset [T]); the first starts at 0 whether or not it resets."""
  starts = sorted({0, *np.flatnonzero(np.asarray(reset_row)).tolist()})
  return list(zip(starts, starts[1:] + [len(reset_row)]))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_inputs(case, seed=0):
  """The scan's arguments (u, delta, A, Bm, Cm, D, z, bias, h0) of a case, built on the host (numpy): no eager XLA
  op (a compile) per shape and dtype."""
  rng = np.random.default_rng(seed)
  B, T, E, N, G, dtype = (case[k] for k in ("B", "T", "E", "N", "G", "dtype"))
  normal = lambda shape, scale=1.0: scale * rng.standard_normal(shape, np.float32)
  u = normal((B, T, E)).astype(dtype)
  if case.get("dt") == "extreme":
    delta = np.where(rng.random((B, T, E)) < 0.5, -12.0, 6.0)
  elif case.get("softplus", True):
    delta = normal((B, T, E)) - 1.0
  else:
    delta = rng.uniform(0.01, 0.5, (B, T, E))
  delta = delta.astype(dtype)
  A = -np.exp(normal((E, N), 0.5))
  bc_shape = (B, T, G, N) if G else (B, T, N)
  Bm, Cm = normal(bc_shape).astype(dtype), normal(bc_shape).astype(dtype)
  D = normal((E,)) if case["D"] else None
  z = normal((B, T, E)).astype(dtype) if case["z"] else None
  bias = normal((E,), 0.5) if case["bias"] else None
  h0 = normal((B, E, N)) if case["h0"] else None
  return (u, delta, A, Bm, Cm, D, z, bias, h0)


class TestSelectiveScan:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_gpu(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled Pallas (Triton) kernels need a GPU; the interpret subclass covers CPU")

  def scan(self, *args, block_sizes=SMALL_BLOCKS, **kwargs):
    return selective_scan(*args, block_sizes=block_sizes, interpret=self.INTERPRET, **kwargs)

  def outputs_and_grads(self, args, cts, blocks, softplus=True, reset=None, fn=None):
    """((y, h_last), gradients of the arrays in args that are not None) for cotangents cts, in one jit."""
    present = [i for i, a in enumerate(args) if a is not None]
    fn = fn or functools.partial(self.scan, block_sizes=blocks)

    @jax.jit
    def run(xs, cts):
      def f(*xs):
        full = list(args)
        for i, x in zip(present, xs):
          full[i] = x
        *rest, h0 = full
        return fn(*rest, delta_softplus=softplus, h0=h0, reset=reset)
      out, vjp = jax.vjp(f, *xs)
      return out, vjp(cts)

    return run([args[i] for i in present], cts)

  def assert_matches_reference(self, args, tol, blocks, softplus=True, reset=None):
    """Forward (y, h_last) and the gradient of every array in args, Pallas vs the reference."""
    present = [i for i, a in enumerate(args) if a is not None]
    u, h_shape = args[0], (args[0].shape[0], args[0].shape[2], args[2].shape[1])
    ct = (host_normal(1, u.shape).astype(u.dtype), host_normal(2, h_shape))
    out, grads = self.outputs_and_grads(args, ct, blocks, softplus, reset)
    out_ref, grads_ref = self.outputs_and_grads(args, ct, blocks, softplus, reset, fn=selective_scan_reference)
    assert out[0].dtype == out_ref[0].dtype and out[1].dtype == jnp.float32
    for name, a, b in (("y", out[0], out_ref[0]), ("h_last", out[1], out_ref[1])):
      assert np.all(np.isfinite(np.asarray(a, np.float32))), name
      assert rel_err(a, b) <= tol, (name, rel_err(a, b))
    for i, g, g_ref in zip(present, grads, grads_ref):
      assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, (NAMES[i], g.shape, g_ref.shape)
      assert np.all(np.isfinite(np.asarray(g, np.float32))), NAMES[i]
      assert rel_err(g, g_ref) <= tol, (NAMES[i], rel_err(g, g_ref))
    return out, grads

  @pytest.mark.parametrize("case", tiered(CASES, {"fp32_full", "bf16_lanes_e_grouped"}))
  def test_forward_and_gradients(self, case):
    self.assert_matches_reference(make_inputs(case), TOL[case["dtype"]], case.get("blocks", SMALL_BLOCKS),
                                  case.get("softplus", True))

  @pytest.mark.parametrize("case", tiered(RESET_CASES, {"segments_prefetch"}))
  def test_packed_documents(self, case):
    """Every layout of RESET_LAYOUTS (one per row) with a nonzero h0: forward and every gradient."""
    args = make_inputs(dict(dtype=jnp.float32, B=len(RESET_LAYOUTS), T=RESET_T, E=16, N=8, G=case["G"], D=True,
                            z=True, bias=True, h0=True))
    reset = make_reset(RESET_LAYOUTS.values(), RESET_T)
    _, grads = self.assert_matches_reference(args, 1e-5, case["blocks"], reset=reset)
    gh0 = np.asarray(grads[-1])
    for row in range(len(reset)):  # a reset at t = 0 cuts h0 off: its gradient is exactly 0
      assert np.all(gh0[row] == 0) if reset[row, 0] else np.all(gh0[row] != 0), row

  def test_all_false_reset_is_no_reset(self):
    """reset given but never set computes what reset=None does (the kernels without the reset input)."""
    args = make_inputs(dict(dtype=jnp.float32, B=2, T=RESET_T, E=16, N=8, G=0, D=True, z=True, bias=True,
                            h0=True), seed=2)
    cts = (host_normal(1, args[0].shape), host_normal(2, args[-1].shape))
    results = [jax.tree.leaves(self.outputs_and_grads(args, cts, RESET_CASES[1]["blocks"], reset=reset))
               for reset in (None, np.zeros((2, RESET_T), np.int32))]
    for name, a, b in zip(("y", "h_last", *NAMES), *results):   # equal up to fp32 rounding (sums reassociate)
      assert rel_err(a, b) <= 1e-6, (name, rel_err(a, b))

  def test_packed_row_equals_documents_alone(self):
    """One packed row (int reset, nonzero = True) gives each document's y as if run alone from h = 0, and the
    last document's final state."""
    case = dict(dtype=jnp.float32, B=1, T=RESET_T, E=16, N=8, G=0, D=True, z=True, bias=True, h0=True)
    u, delta, A, Bm, Cm, D, z, bias, h0 = make_inputs(case, seed=3)
    reset = jnp.zeros((1, RESET_T), jnp.int32).at[0, jnp.array([0, 16, 21])].set(3)   # docs of 16, 5, 16
    # jitted: each call one compile (the two documents of 16 share one), not the interpreter run op by op
    scan = jax.jit(functools.partial(self.scan, block_sizes=RESET_CASES[1]["blocks"]))
    y, h_last = scan(u, delta, A, Bm, Cm, D, z, bias, h0=h0, reset=reset)
    for start, end in doc_bounds(reset[0]):
      cut = lambda x: x[:, start:end]
      y_doc, h_doc = scan(*map(cut, (u, delta)), A, *map(cut, (Bm, Cm)), D, cut(z), bias)
      np.testing.assert_allclose(y[:, start:end], y_doc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_last, h_doc, rtol=1e-5, atol=1e-6)

  @pytest.mark.parametrize("segments", [pytest.param(5, marks=pytest.mark.slow), 16])   # no unrolling / two
                                                                                         # unrolled groups of 8
  def test_carry_over_segments(self, segments):
    rng = np.random.default_rng(segments)                  # inputs built on the host: no eager op per shape
    loc = rng.standard_normal((2, segments, 24, 8), np.float32)
    dtsum = rng.uniform(0.0, 3.0, (2, segments, 24)).astype(np.float32)
    a2 = -np.exp(rng.standard_normal((24, 8), np.float32))
    init = rng.standard_normal((2, 24, 8), np.float32)
    seg_reset = np.zeros((2, segments), np.float32)
    seg_reset[0, 1] = seg_reset[1, segments - 2] = 1.0
    for carry, reverse in ((carry_states, False), (carry_adjoints, True)):
      out = carry(loc, dtsum, a2, init, fast_math=True, interpret=self.INTERPRET)
      ref = carry_reference(loc, dtsum, a2, init, reverse=reverse)
      assert out.shape == ref.shape and rel_err(out, ref) <= 1e-6, (reverse, rel_err(out, ref))
      np.testing.assert_array_equal(out[:, -1 if reverse else 0], init)   # the first segment walked gets init
      # a segment holding a reset passes on only its own summary: the next segment walked gets exactly loc
      out = carry(loc, dtsum, a2, init, seg_reset, fast_math=True, interpret=self.INTERPRET)
      ref = carry_reference(loc, dtsum, a2, init, seg_reset, reverse=reverse)
      assert rel_err(out, ref) <= 1e-6, (reverse, rel_err(out, ref))
      step = -1 if reverse else 1
      np.testing.assert_array_equal(ref[0, 1 + step], loc[0, 1])
      np.testing.assert_array_equal(ref[1, segments - 2 + step], loc[1, segments - 2])

  def test_time_segments_plan(self):
    u, delta, A, Bm, *_ = make_inputs(CASES[0])                       # T = 37
    plan = lambda bs: _plan(u, Bm, A, bs)
    assert (plan(SMALL_BLOCKS).segments, plan(SMALL_BLOCKS).seg_len, plan(SMALL_BLOCKS).t_pad) == (3, 16, 48)
    assert (plan(NO_PREFETCH).segments, plan(NO_PREFETCH).t_pad) == (1, 40)
    long = BlockSizes(chunk=16, chunk_bwd=8, segment_len=512)          # rounds to chunks, balances segments
    assert plan(long).segments == 1
    u4k = jnp.zeros((1, 4100, 16))
    p = _plan(u4k, jnp.zeros((1, 4100, 8)), A, long)
    assert (p.segments, p.seg_len, p.t_pad) == (9, 464, 4176)
    # Enough programs (batch x E / block_e) fill the GPU without time segments: 4 x 16 / 16 = 4 programs.
    few = dataclasses.replace(long, block_e=16, segment_below_programs=4)
    assert _plan(jnp.zeros((4, 4100, 16)), jnp.zeros((4, 4100, 8)), A, few).segments == 1
    assert _plan(jnp.zeros((3, 4100, 16)), jnp.zeros((3, 4100, 8)), A, few).segments == 9
    assert _plan(u4k, jnp.zeros((1, 4100, 8)), A, dataclasses.replace(few, segment_below_programs=0)).segments == 9
    with pytest.raises(ValueError, match="segment_len"):
      BlockSizes(segment_len=-1)
    with pytest.raises(ValueError, match="segment_below_programs"):
      BlockSizes(segment_below_programs=-1)

  def test_checks_shapes(self):
    u, delta, A, Bm, Cm, D, z, bias, h0 = make_inputs(CASES[0])
    with pytest.raises(ValueError, match=r"A must be \[E, N\].*A=\(15, 8\)"):
      self.scan(u, delta, A[:15], Bm, Cm)
    with pytest.raises(ValueError, match="Bm and Cm"):
      self.scan(u, delta, A, Bm, Cm[:, :-1])
    with pytest.raises(ValueError, match=r"h0 must be \[B, E, N\]"):
      self.scan(u, delta, A, Bm, Cm, h0=h0[:, :, :4])
    with pytest.raises(ValueError, match="E must be a multiple of G"):
      self.scan(u, delta, A, jnp.zeros((2, 37, 3, 8)), jnp.zeros((2, 37, 3, 8)))
    with pytest.raises(ValueError, match=r"reset must be \[B, T\].*reset=\(2, 36\)"):
      self.scan(u, delta, A, Bm, Cm, reset=jnp.zeros((2, 36), bool))
    with pytest.raises(ValueError, match=r"reset must be \[B, T\]"):
      self.scan(u, delta, A, Bm, Cm, reset=jnp.zeros((2, 37, 1), bool))


class TestSelectiveScanInterpret(TestSelectiveScan):
  INTERPRET = True


def test_segment_resets():
  reset = jnp.zeros((2, 12)).at[0, 4].set(1.0).at[1, 11].set(1.0)   # 3 segments of 4 tokens
  np.testing.assert_array_equal(segment_resets(reset, 3), [[0, 1, 0], [0, 0, 1]])


def test_reference_packed_equals_documents_alone():
  """The reference with resets vs its definition, the plain recurrence run on each document alone from h = 0
  (from h0 for a row's first document unless t = 0 resets): y, the final state and every gradient.

  Each document gets a row of its own with u = 0 outside it, so its state is exactly 0 up to its first token and
  nothing outside it reaches the loss (zero cotangents there): per-token gradients are read inside the document,
  A, D and delta_bias sum over all documents, and h0's gradient comes from the documents that keep h0."""
  case = dict(dtype=jnp.float32, B=len(RESET_LAYOUTS), T=RESET_T, E=8, N=4, G=2, D=True, z=True, bias=True,
              h0=True)
  args = make_inputs(case, seed=4)
  reset = np.asarray(make_reset(RESET_LAYOUTS.values(), RESET_T, seed=4))
  gy, gh = host_normal(5, args[0].shape), host_normal(6, args[-1].shape)

  @jax.jit
  def outputs_and_grads(args, cts, reset):
    out, vjp = jax.vjp(lambda *a: selective_scan_reference(*a[:8], h0=a[8], reset=reset), *args)
    return out, vjp(cts)

  (y, h_last), grads = outputs_and_grads(args, (gy, gh), reset)

  docs = [(b, start, end) for b in range(len(reset)) for start, end in doc_bounds(reset[b])]
  rows = np.array([b for b, _, _ in docs])
  inside = np.stack([(np.arange(RESET_T) >= start) & (np.arange(RESET_T) < end) for _, start, end in docs])
  keeps_h0 = np.array([start == 0 and not reset[b, 0] for b, start, _ in docs])
  last = np.array([end == RESET_T for _, _, end in docs])
  doc_args = [x if NAMES[i] in ("A", "D", "delta_bias") else x[rows] for i, x in enumerate(args)]
  doc_args[0] = doc_args[0] * inside[..., None]                          # u
  doc_args[8] = doc_args[8] * keeps_h0[:, None, None]                    # h0
  cts = (gy[rows] * inside[..., None], gh[rows] * last[:, None, None])
  (y_docs, h_docs), g_docs = outputs_and_grads(doc_args, cts, None)

  def per_row(x, mask):  # [docs, ...] -> [B, ...]: each row's sum over its documents, where mask is set
    return np.stack([np.sum(np.where(mask[rows == b], x[rows == b], 0.0), axis=0) for b in range(len(reset))])

  inside_ = inside[:, :, None]
  np.testing.assert_allclose(y, per_row(y_docs, inside_), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h_last, per_row(h_docs, last[:, None, None]), rtol=1e-5, atol=1e-6)
  for name, g, g_doc in zip(NAMES, grads, g_docs):
    if name in ("A", "D", "delta_bias"):
      want = g_doc
    elif name == "h0":
      want = per_row(g_doc, keeps_h0[:, None, None])
    else:
      want = per_row(g_doc, inside_ if g_doc.ndim == 3 else inside_[..., None])
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5, err_msg=name)
  assert np.all(np.asarray(grads[8])[reset[:, 0]] == 0)                 # a reset at t = 0 cuts h0 off
