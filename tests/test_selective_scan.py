"""Pallas selective scan vs the sequential reference: forward and every gradient.

`TestSelectiveScan` runs the kernels compiled (GPU: `python -m pytest tests/test_selective_scan.py` on a GPU
machine); `TestSelectiveScanInterpret` reruns the same cases in Pallas' interpreter, which is what CI (CPU)
exercises. Shapes are tiny so the interpreter finishes quickly; the tolerances are the issue's
(rel err ||a - b|| / ||b||: fp32 <= 1e-4, bf16 <= 2e-2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan import BlockSizes, selective_scan, selective_scan_reference
from pallas_kernels.selective_scan.ops import _plan
from pallas_kernels.selective_scan.segments import carry_adjoints, carry_reference, carry_states

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
]


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_inputs(case, seed=0):
  ks = iter(jax.random.split(jax.random.PRNGKey(seed), 12))
  B, T, E, N, G, dtype = (case[k] for k in ("B", "T", "E", "N", "G", "dtype"))
  normal = lambda shape, scale=1.0: scale * jax.random.normal(next(ks), shape, jnp.float32)
  u = normal((B, T, E)).astype(dtype)
  if case.get("dt") == "extreme":
    delta = jnp.where(jax.random.bernoulli(next(ks), 0.5, (B, T, E)), -12.0, 6.0)
  elif case.get("softplus", True):
    delta = normal((B, T, E)) - 1.0
  else:
    delta = jax.random.uniform(next(ks), (B, T, E), minval=0.01, maxval=0.5)
  delta = delta.astype(dtype)
  A = -jnp.exp(normal((E, N), 0.5))
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

  @pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
  def test_forward_and_gradients(self, case):
    args = make_inputs(case)
    softplus = case.get("softplus", True)
    present = [i for i, a in enumerate(args) if a is not None]

    def wrap(fn, **kw):
      def f(*xs):
        full = list(args)
        for i, x in zip(present, xs):
          full[i] = x
        *rest, h0 = full
        return fn(*rest, delta_softplus=softplus, h0=h0, **kw)
      return jax.jit(f)

    xs = [args[i] for i in present]
    out, vjp = jax.vjp(wrap(self.scan, block_sizes=case.get("blocks", SMALL_BLOCKS)), *xs)
    out_ref, vjp_ref = jax.vjp(wrap(selective_scan_reference), *xs)
    tol = TOL[case["dtype"]]
    assert out[0].dtype == out_ref[0].dtype and out[1].dtype == jnp.float32
    for name, a, b in (("y", out[0], out_ref[0]), ("h_last", out[1], out_ref[1])):
      assert np.all(np.isfinite(np.asarray(a, np.float32))), name
      assert rel_err(a, b) <= tol, (name, rel_err(a, b))
    ks = jax.random.split(jax.random.PRNGKey(1), 2)
    ct = (jax.random.normal(ks[0], out_ref[0].shape).astype(out_ref[0].dtype),
          jax.random.normal(ks[1], out_ref[1].shape))
    grads, grads_ref = vjp(ct), vjp_ref(ct)
    for i, g, g_ref in zip(present, grads, grads_ref):
      assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, (NAMES[i], g.shape, g_ref.shape)
      assert np.all(np.isfinite(np.asarray(g, np.float32))), NAMES[i]
      assert rel_err(g, g_ref) <= tol, (NAMES[i], rel_err(g, g_ref))

  @pytest.mark.parametrize("segments", [5, 16])                     # no unrolling / two unrolled groups of 8
  def test_carry_over_segments(self, segments):
    ks = jax.random.split(jax.random.PRNGKey(segments), 4)
    loc = jax.random.normal(ks[0], (2, segments, 24, 8))
    dtsum = jax.random.uniform(ks[1], (2, segments, 24), maxval=3.0)
    a2 = -jnp.exp(jax.random.normal(ks[2], (24, 8)))
    init = jax.random.normal(ks[3], (2, 24, 8))
    for carry, reverse in ((carry_states, False), (carry_adjoints, True)):
      out = carry(loc, dtsum, a2, init, fast_math=True, interpret=self.INTERPRET)
      ref = carry_reference(loc, dtsum, a2, init, reverse=reverse)
      assert out.shape == ref.shape and rel_err(out, ref) <= 1e-6, (reverse, rel_err(out, ref))
      np.testing.assert_array_equal(out[:, -1 if reverse else 0], init)   # the first segment walked gets init

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
    with pytest.raises(ValueError, match="segment_len"):
      BlockSizes(segment_len=-1)

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


class TestSelectiveScanInterpret(TestSelectiveScan):
  INTERPRET = True
