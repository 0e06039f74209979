"""A decode token's cache update kernel (pallas_kernels/decode_update; Pallas' interpreter on a CPU, compiled on a
GPU) = its jnp reference bit for bit (it only moves data and compares scores), with and without candidates,
fading buffer and innovation history; the compiled kernel lowers to Triton in place; bad inputs are refused.
The model's use of it: tests/test_decode_update_step.py."""

import dataclasses
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmojo_jax.memory.store import NO_POS, Store, empty_store
from bmojo_jax.pallas_kernels.decode_update import (BlockSizes, decode_token_update,
                                                    decode_token_update_reference)
from tests.conftest import host_normal
from tests.test_train_sharding import run_on_8_devices

# What each row's candidates look like (row r gets KINDS[r % 5]) and whether the new token replaces one:
#   empty:   every slot empty (-inf, NO_POS): the first slot goes;
#   partly:  half the slots filled, in shuffled places: the first empty slot goes;
#   ties:    full, two slots tied at the worst score: the later position goes;
#   equal:   full, the new score equal to the worst: nothing (strictly larger only);
#   below:   full, the new score below every one: nothing.
KINDS = ("empty", "partly", "ties", "equal", "below")
REPLACES = {"empty": True, "partly": True, "ties": True, "equal": False, "below": False}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  b: int
  s: int            # ring slots
  k: int            # kv heads
  p: int            # head size (K·P need not be a power of two)
  k_e: int          # candidate slots
  t: int            # the token's position
  ring_dtype: str = "float32"
  m_f: int = 0      # fading buffer rows (0: no fading update), each a read-out of width d, or K·P without history
  d: int = 0        # the history's width D (0: no history update)


CASES = [
    Case("ke3_features6_t_lt_s", b=5, s=5, k=2, p=3, k_e=3, t=2),
    Case("ke5_bf16_ring_wrapped", b=5, s=6, k=1, p=4, k_e=5, t=23, ring_dtype="bfloat16"),
    Case("ke4_t_eq_s", b=4, s=8, k=2, p=8, k_e=4, t=8),
    Case("ke1_batch1", b=1, s=3, k=1, p=2, k_e=1, t=4),
]


def candidates(case: Case, seed: int = 0):
  """(cand Store of host arrays, new scores [B], kinds of the rows) as KINDS describes."""
  rng = np.random.default_rng(seed)
  b, k_e = case.b, case.k_e
  score = np.full((b, k_e), -np.inf, np.float32)
  pos = np.full((b, k_e), NO_POS, np.int32)
  new = np.empty(b, np.float32)
  kinds = [KINDS[r % len(KINDS)] for r in range(b)]
  for r, kind in enumerate(kinds):
    filled = {"empty": 0, "partly": k_e // 2}.get(kind, k_e)
    score[r, :filled] = rng.integers(1, 4, filled)                 # small integers: ties among them too
    pos[r, :filled] = rng.permutation(np.delete(np.arange(case.t + k_e + 1), case.t))[:filled]   # never t
    if kind == "ties" and filled >= 2:
      score[r, rng.choice(filled, 2, replace=False)] = 0.5
    worst = score[r].min()
    new[r] = {"equal": worst, "below": worst - 1.0, "ties": worst + 1.0}.get(kind, rng.normal())
    order = rng.permutation(k_e)                                   # empty slots anywhere
    score[r], pos[r] = score[r, order], pos[r, order]
  kv = host_normal(seed + 1, (2, b, k_e, case.k, case.p))
  cand = Store(k=kv[0], v=kv[1], score=score, pos=pos)
  return cand, new, kinds


def inputs(case: Case):
  """(ring_k, ring_v, cand, k, v, k_raw, score, t, fading, history) with fading None where case.m_f is 0 and
  history None where case.d is 0, and the kinds of the rows' candidates."""
  dt = jnp.dtype(case.ring_dtype)
  ring = host_normal(2, (2, case.b, case.s, case.k, case.p))
  cand, score, kinds = candidates(case)
  cand = cand._replace(k=jnp.asarray(cand.k, dt), v=jnp.asarray(cand.v, dt))
  k, v, k_raw = host_normal(3, (3, case.b, case.k, case.p))         # fp32: the kernel casts to the ring's dtype
  fading = None
  if case.m_f:                                                      # the buffer in the ring's dtype, the read-out fp32
    width = case.d or case.k * case.p
    fading = (jnp.asarray(host_normal(6, (case.b, case.m_f, width)), dt), host_normal(7, (case.b, width)))
  history = None
  if case.d:                                                        # fp32 history, the input a in the ring's dtype
    history = (host_normal(8, (case.b, 4, case.d)), jnp.asarray(host_normal(9, (case.b, case.d)), dt))
  args = (jnp.asarray(ring[0], dt), jnp.asarray(ring[1], dt), cand, k, v, k_raw, score, np.int32(case.t), fading,
          history)
  return args, kinds


def assert_same(got, want):
  """Every leaf of two pytrees equal in dtype, shape and every bit."""
  leaves = jax.tree_util.tree_leaves_with_path(got)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(leaves, jax.tree.leaves(want)):
    name = jax.tree_util.keystr(path)
    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a),
                                  np.asarray(b.astype(jnp.float32) if b.dtype == jnp.bfloat16 else b), name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_reference_bit_exact(case):
  """Ring slot t mod S and the candidates as the reference leaves them, every bit, in one compile, with a row's
  features in one program and split over several (block_f 2: up to 8 programs a row, the first of them owning
  the candidates); the rows that should replace a candidate did, the others did not."""
  args, kinds = inputs(case)
  split = lambda *a: decode_token_update(*a, block_sizes=BlockSizes(block_f=2), interpret=None)
  both = jax.jit(lambda *a: (decode_token_update(*a, interpret=None), split(*a), decode_token_update_reference(*a)))
  got, got_split, want = both(*args)
  assert_same(got, want)
  assert_same(got_split, want)
  cand, new_cand = args[2], got[2]
  for r, kind in enumerate(kinds):
    taken = int(np.sum(np.asarray(new_cand.pos[r]) == case.t))
    assert taken == REPLACES[kind], (r, kind)
    assert int(np.sum(np.asarray(new_cand.pos[r]) != cand.pos[r])) == taken
  slot = case.t % case.s
  np.testing.assert_array_equal(np.asarray(got[0][:, slot], np.float32),
                                np.asarray(jnp.asarray(args[3], got[0].dtype), np.float32))
  untouched = np.arange(case.s) != slot
  np.testing.assert_array_equal(np.asarray(got[1][:, untouched]), np.asarray(args[1][:, untouched]))


def test_kernel_matches_reference_over_a_sequence():
  """Tokens 0..12 one by one from an empty store (integer scores: many ties), ring of 5 slots wrapping twice,
  a fading buffer of 3 read-outs and a history of 4 inputs, both of width 6, in a lax.scan, each row's features
  split over 4 programs (the width 6 over 4 blocks of 2, the last empty): every state of the kernel's = the
  reference's."""
  b, s, kh, p, k_e, m_f, d, n = 3, 5, 2, 4, 3, 3, 6, 13
  scores = np.random.default_rng(4).integers(0, 4, (n, b)).astype(np.float32)
  scores[5, 1] = -np.inf                                          # a -inf score never enters
  kv = host_normal(5, (3, n, b, kh, p))
  read_out, a = host_normal(10, (2, n, b, d))
  zeros = lambda rows: jnp.zeros((b, rows, kh, p))
  start = (zeros(s), zeros(s), empty_store(b, k_e, kh, p, jnp.float32), jnp.zeros((b, m_f, d)), jnp.zeros((b, 4, d)))

  def run(update):
    def body(carry, xs):
      k, v, k_raw, r, a, score, t = xs
      carry = update(carry[0], carry[1], carry[2], k, v, k_raw, score, t, (carry[3], r), (carry[4], a))
      return carry, carry
    return jax.lax.scan(body, start, (*kv, read_out, a, scores, jnp.arange(n, dtype=jnp.int32)))[1]

  kernel = lambda *a: decode_token_update(*a, block_sizes=BlockSizes(block_f=2), interpret=None)
  got, want = jax.jit(lambda: (run(kernel), run(decode_token_update_reference)))()
  assert_same(got, want)
  assert bool(np.all(np.asarray(want[2].valid[-1])))               # the candidates filled up
  np.testing.assert_array_equal(np.asarray(want[3][-1]), read_out[-m_f:].transpose(1, 0, 2))  # the last 3 read-outs
  np.testing.assert_array_equal(np.asarray(want[4][-1]), a[-4:].transpose(1, 0, 2))             # the last 4 a


def test_ring_only_update():
  """cand, fading and history None (no memory tokens: the Transformer's and the Hybrid's): the ring writes alone."""
  case = CASES[2]
  (rk, rv, _, k, v, _, _, t, _, _), _ = inputs(case)
  both = jax.jit(lambda *a: (decode_token_update(*a, interpret=None), decode_token_update_reference(*a)))
  got, want = both(rk, rv, None, k, v, None, None, t)
  assert got[2:] == (None,) * 3 and want[2:] == (None,) * 3
  assert_same(got[:2], want[:2])


SHIFT_CASES = [
    Case("mf1_ke3_d5", b=5, s=5, k=2, p=3, k_e=3, t=2, m_f=1, d=5),
    Case("mf3_ke5_bf16", b=5, s=6, k=1, p=4, k_e=5, t=23, ring_dtype="bfloat16", m_f=3),
    Case("mf4_ke4_d8", b=4, s=8, k=2, p=8, k_e=4, t=8, m_f=4, d=8),
    Case("history_only_bf16", b=3, s=4, k=1, p=4, k_e=2, t=5, ring_dtype="bfloat16", d=7),
]


@pytest.mark.parametrize("with_cand", [True, False], ids=["cand", "no_cand"])
@pytest.mark.parametrize("case", SHIFT_CASES, ids=lambda c: c.name)
def test_shifts_match_reference_bit_exact(case, with_cand):
  """With the fading buffer and/or the innovation history (with candidates: B'MOJO; without: B'MOJO-F) every array
  as the reference leaves it, every bit: each buffer one row up with the new row (cast to its dtype) last, in
  place; a row in one program (block_f 0, groups of 4 rows) and split over programs (block_f 2). M_f = 4 with
  shift_rows 3 (features split) and 1: groups of rows that do not divide M_f - 1, and one row at a time."""
  args, _ = inputs(case)
  if not with_cand:
    args = args[:2] + (None,) + args[3:5] + (None, None) + args[7:]
  blocks = [BlockSizes(), BlockSizes(block_f=0, shift_rows=4), BlockSizes(block_f=2)] + (
      [BlockSizes(block_f=2, shift_rows=3), BlockSizes(shift_rows=1)] if case.m_f == 4 else [])
  fns = [lambda *a, bs=bs: decode_token_update(*a, block_sizes=bs, interpret=None) for bs in blocks]
  got, want = jax.jit(lambda *a: ([fn(*a) for fn in fns], decode_token_update_reference(*a)))(*args)
  if case.m_f:                                                      # the reference is the shift
    buf, new = args[8]
    np.testing.assert_array_equal(np.asarray(want[3][:, :-1]), np.asarray(buf[:, 1:]))
    np.testing.assert_array_equal(np.asarray(want[3][:, -1]), np.asarray(jnp.asarray(new, buf.dtype)))
  if case.d:
    history, a = args[9]
    np.testing.assert_array_equal(np.asarray(want[4]), np.concatenate([history[:, 1:], np.asarray(
        a.astype(jnp.float32))[:, None]], axis=1))
  for g in got:
    assert (g[2] is None) == (not with_cand) and (g[3] is None) == (not case.m_f) and (g[4] is None) == (not case.d)
    assert_same(g, want)


MESH_SCRIPT = textwrap.dedent("""
    import jax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from bmojo_jax.pallas_kernels.decode_update import decode_token_update, decode_token_update_reference
    from bmojo_jax.pallas_kernels.sharding import use_mesh
    from tests.test_decode_update import Case, assert_same, inputs

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    args, _ = inputs(Case("mesh", b=4, s=5, k=2, p=4, k_e=3, t=7, m_f=3, d=6))
    args = jax.device_put(args, NamedSharding(mesh, P()))

    def kernel(*a):
      with use_mesh(mesh):
        return decode_token_update(*a, interpret=None)

    text = jax.jit(kernel).lower(*args).as_text()
    assert "manual_computation" in text or "shard_map" in text, "not run per shard"
    assert_same(jax.jit(kernel)(*args), jax.jit(decode_token_update_reference)(*args))
    print("RESULT{}")
""")


def test_kernel_per_shard_under_a_mesh():
  """Under a 2x2x2 mesh (8 fake CPU devices, one subprocess) the kernel runs per shard, rows over data x fsdp and
  kv heads over tensor, each shard deciding its rows' candidates and shifting its fading rows and history alone:
  the reference's result, bit for bit."""
  assert run_on_8_devices(MESH_SCRIPT) == {}


@pytest.mark.parametrize("family, aliased, operands", [("bmojo", 8, 15), ("bmojo_no_shifts", 6, 11),
                                                       ("bmojo_f", 3, 7)])
@pytest.mark.parametrize("b", [1, 64])
def test_kernel_lowers_for_gpu_in_place(b, family, aliased, operands):
  """The compiled kernel (not the interpreter) lowers to Triton for a GPU, on a CPU too, at the 1.4B B'MOJO shapes
  (S 512, K 32, P 64, M_f 16, k_e 16, D 2048, bf16; B'MOJO-F: fading without candidates or history): one custom
  call whose cache arrays (ring k, v, fading read-outs, history, candidates k, v, scores and positions) alias its
  outputs (updated in place), each passed once: t, k, v, (the read-out), (a), (k_raw, score) and the aliased
  arrays."""
  sds = jax.ShapeDtypeStruct
  rows = lambda n: sds((b, n, 32, 64), jnp.bfloat16)
  kv = sds((b, 32, 64), jnp.bfloat16)
  cand = Store(rows(16), rows(16), sds((b, 16), jnp.float32), sds((b, 16), jnp.int32))
  cand_args = (cand, kv, sds((b,), jnp.float32)) if family != "bmojo_f" else (None, None, None)
  fading = (sds((b, 16, 2048), jnp.bfloat16), sds((b, 2048), jnp.bfloat16)) if family != "bmojo_no_shifts" else None
  history = (sds((b, 4, 2048), jnp.float32), sds((b, 2048), jnp.bfloat16)) if family == "bmojo" else None
  fn = lambda rk, rv, cand, k, v, k_raw, score, t, fading, history: decode_token_update(
      rk, rv, cand, k, v, k_raw, score, t, fading, history, interpret=False)
  text = jax.jit(fn).trace(rows(512), rows(512), cand_args[0], kv, kv, *cand_args[1:], sds((), jnp.int32),
                           fading, history).lower(lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "custom_call" in line and "triton" in line]
  assert len(calls) == 1 and "decode_token_update" in text
  assert calls[0].count("#stablehlo.output_operand_alias<") == aliased
  names = re.search(r"triton\(([^)]*)\)", calls[0]).group(1).split(", ")
  assert len(set(names)) == len(names) == operands, names          # none passed twice (XLA would copy it)


@pytest.mark.parametrize("change, match", [
    (dict(ring_v=(2, 6, 2, 4)), r"ring_k \(2, 5, 2, 4\) and ring_v \(2, 6, 2, 4\) must be \[B, S, K, P\]"),
    (dict(k=(2, 2, 3)), r"k \(2, 2, 3\) must be \[B, K, P\]"),
    (dict(v=(1, 2, 4)), r"v \(1, 2, 4\) must be \[B, K, P\]"),
    (dict(k_raw=(2, 4)), r"k_raw \(2, 4\) must be \[B, K, P\]"),
    (dict(score=(2, 1)), r"score \(2, 1\) must be \[B\]"),
    (dict(t=(1,)), "t must be a scalar position"),
    (dict(cand_k=(2, 3, 2, 8)), r"cand.k \(2, 3, 2, 8\) and cand.v \(2, 3, 2, 4\) must be \[B, k_e, K, P\]"),
    (dict(cand_pos=(2, 4)), r"cand.pos \(2, 4\) must be \[B, k_e\]"),
    (dict(cand_k=(2, 0, 2, 4), cand_v=(2, 0, 2, 4)), "cand holds no slots"),
    (dict(next=(3, 3, 5)), r"fading.next \(3, 3, 5\) must be \[B, M_f, D\] = \[2, M_f >= 1, D\]"),
    (dict(next=(2, 0, 5)), r"fading.next \(2, 0, 5\) must be \[B, M_f, D\]"),
    (dict(next=(2, 3, 2, 4)), r"fading.next \(2, 3, 2, 4\) must be \[B, M_f, D\]"),
    (dict(read_out=(2, 6)), r"fading.read_out \(2, 6\) must be \[B, D\] = \(2, 5\)"),
    (dict(read_out=(2, 1, 5)), r"fading.read_out \(2, 1, 5\) must be \[B, D\]"),
    (dict(fading_len=3), r"fading must be \(next, read_out\) or None, got a tuple of 3"),
    (dict(history=(2, 3, 5)), r"history \(2, 3, 5\) float32 must be \[B, 4, D\] = \[2, 4, D\] float32"),
    (dict(history_dtype=jnp.bfloat16), r"history \(2, 4, 5\) bfloat16 must be \[B, 4, D\]"),
    (dict(a=(2, 6)), r"history's a \(2, 6\) must be \[B, D\] = \(2, 5\)"),
    (dict(history_len=1), r"history must be \(history, a\) or None, got a tuple of 1"),
])
def test_bad_inputs_are_refused(change, match):
  shape = lambda name, default: change.get(name, default)
  ring_k = jnp.zeros(shape("ring_k", (2, 5, 2, 4)))
  ring_v = jnp.zeros(shape("ring_v", (2, 5, 2, 4)))
  cand = Store(jnp.zeros(shape("cand_k", (2, 3, 2, 4))), jnp.zeros(shape("cand_v", (2, 3, 2, 4))),
               jnp.zeros(shape("cand_score", (2, 3))), jnp.zeros(shape("cand_pos", (2, 3)), jnp.int32))
  fading = (jnp.zeros(shape("next", (2, 3, 5))), jnp.zeros(shape("read_out", (2, 5))),
            jnp.zeros((2, 5)))[:change.get("fading_len", 2)]
  args = (ring_k, ring_v, cand, jnp.zeros(shape("k", (2, 2, 4))), jnp.zeros(shape("v", (2, 2, 4))),
          jnp.zeros(shape("k_raw", (2, 2, 4))), jnp.zeros(shape("score", (2,))), jnp.zeros(shape("t", ()), jnp.int32),
          fading, (jnp.zeros(shape("history", (2, 4, 5)), change.get("history_dtype", jnp.float32)),
                   jnp.zeros(shape("a", (2, 5))))[:change.get("history_len", 2)])
  for fn in (decode_token_update, decode_token_update_reference):
    with pytest.raises(ValueError, match=match):
      fn(*args)
