"""Innovation selection and the eidetic store against plain-Python models of the policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmojo_jax.config import Selection, StorePolicy
from bmojo_jax.memory.parallel_store import stores_before_chunks, stores_before_chunks_reference
from bmojo_jax.memory.scoring import ScoreInputs, innovation_scores, last_inputs, selection_scores
from bmojo_jax.memory.selection import insert_candidate, select_per_chunk
from bmojo_jax.memory.store import NO_POS, by_position, empty_store
from tests.conftest import host_normal

# Compiled once per shape (the cases draw random lengths), not run op by op: a compile per op and shape.
select = jax.jit(select_per_chunk, static_argnums=(3, 4))
parallel_stores = jax.jit(stores_before_chunks, static_argnums=(1, 2))
sequential_stores = jax.jit(stores_before_chunks_reference, static_argnums=(1, 2))


def test_innovation_picks_planted_tokens():
  b, t, d, chunk = 2, 32, 8, 8
  a = 0.01 * host_normal(0, (b, t, d))             # inputs built on the host: no eager op per shape
  planted = [3, 12, 13, 30]
  a[:, planted] += 3.0
  scores = innovation_scores(a)
  k = np.arange(b * t * 4, dtype=np.float32).reshape(b, t, 2, 2)
  sel = jax.device_get(select(scores, k, k, chunk, 2))                 # checked on the host
  chosen = set(np.asarray(sel.pos[0][sel.valid[0]]).tolist())
  assert set(planted) <= chosen
  # Keys of the selected tokens are the tokens' own keys.
  np.testing.assert_array_equal(sel.k[0, 0, 0], k[0, sel.pos[0, 0, 0]])


def test_innovation_definition():
  a = host_normal(1, (1, 9, 3))
  scores = innovation_scores(a)
  padded = np.concatenate([np.zeros((4, 3)), np.asarray(a[0])])
  want = [np.sum((padded[t + 4] - padded[t:t + 4].mean(0)) ** 2) for t in range(9)]
  np.testing.assert_allclose(scores[0], want, rtol=1e-5)
  np.testing.assert_array_equal(last_inputs(a)[0], a[0, -4:])
  # one token from its history (a decode step's path, the taps read from the history as it is): the same bits
  for t in (2, 6):
    one = innovation_scores(a[:, t:t + 1], last_inputs(a[:, :t]))
    np.testing.assert_array_equal(one[0], scores[0, t:t + 1])


def python_policy(chunks, capacity, policy):
  """The store before each chunk, as sorted lists of (position, score). chunks: list of [(pos, score)]."""
  store, before = [], []
  for sel in chunks:
    before.append(sorted(store))
    sel = sorted(sel)
    if policy == "fifo":
      store = (store + sel)[-capacity:]
    else:
      store = sorted(store + sel, key=lambda e: (-e[1], e[0]))[:capacity]
  return before, sorted(store)


@pytest.mark.parametrize("policy", ["fifo", "score"])
@pytest.mark.parametrize("with_starts", [   # six compiles a case: the inner loop empties stores (packed rows),
    pytest.param(False, marks=pytest.mark.slow), True])   # CI also runs rows of one document (starts None)
def test_parallel_stores_equal_the_sequential_merge(policy, with_starts):
  """stores_before_chunks (a gather / an associative scan) == the chunk-by-chunk merge, entry for entry: tied
  scores, a partial last chunk, -inf scores (never selected) and stores emptied at random chunks."""
  rng = np.random.default_rng(1)
  for trial in range(3):
    b, t, chunk, k_e = 2, int(rng.integers(40, 160)), 8, [1, 2, 4][trial]
    size = k_e * int(rng.integers(1, 5))
    if policy == "score":                   # any M_e >= k_e (the FIFO store holds whole chunks)
      size += int(rng.integers(0, k_e))
    e = rng.integers(0, 5, (b, t)).astype(np.float32) if trial != 1 else rng.normal(size=(b, t)).astype(np.float32)
    e[:, rng.integers(0, t, 6)] = -np.inf
    k, v = (jnp.asarray(rng.normal(size=(b, t, 2, 3)), jnp.float32) for _ in range(2))
    sel = select(jnp.asarray(e), k, v, chunk, k_e)
    starts = None
    if with_starts:
      starts = rng.random(sel.valid.shape[:2]) < 0.3                                   # [B, C]
      starts[:, 0] = True
    want = sequential_stores(sel, size, StorePolicy(policy), starts)
    got = parallel_stores(sel, size, StorePolicy(policy), starts)
    for name, x, y in zip(want._fields, want, got):
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=f"{policy} trial {trial}: {name}")


@pytest.mark.parametrize("policy", ["fifo", "score"])
def test_parallel_stores_from_an_initial_store(policy):
  """A sequence continued mid-way: the stores before chunks c.. given the store before chunk c (`initial`) are
  those of the whole sequence, in the parallel form and the sequential reference alike, entry for entry."""
  rng = np.random.default_rng(2)
  for trial in range(3):
    b, t, chunk, k_e = 2, int(rng.integers(60, 160)), 8, [1, 2, 4][trial]
    size = k_e * int(rng.integers(1, 5)) + (int(rng.integers(0, k_e)) if policy == "score" else 0)
    e = rng.integers(0, 5, (b, t)).astype(np.float32)
    e[:, rng.integers(0, t, 6)] = -np.inf
    k, v = (jnp.asarray(rng.normal(size=(b, t, 2, 3)), jnp.float32) for _ in range(2))
    sel = select(jnp.asarray(e), k, v, chunk, k_e)
    sel = jax.device_get(sel)                     # host copies: sliced with numpy, not an eager op per shape
    whole = jax.device_get(sequential_stores(sel, size, StorePolicy(policy)))
    c = int(rng.integers(1, sel.score.shape[1]))                                  # continue from chunk c
    initial, later = (jax.tree.map(f, whole) for f in (lambda x: x[:, c], lambda x: x[:, c:]))
    rest = jax.tree.map(lambda x: x[:, c:], sel)
    for fn in (sequential_stores, parallel_stores):
      got = fn(rest, size, StorePolicy(policy), None, initial)
      for name, x, y in zip(later._fields, later, got):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=f"{fn.__name__} trial {trial}: {name}")
    assert int(np.sum(initial.valid)) > 0


@pytest.mark.parametrize("policy, k_e, capacity", [("fifo", 2, 6), ("score", 2, 6),
                                                  ("score", 8, 12)])   # k_e = chunk: every token competes
def test_store_policies_match_python_model(policy, k_e, capacity):
  rng = np.random.default_rng(0)
  b, chunk, n_chunks = 2, 8, 25
  t = chunk * n_chunks - 3                                    # a partial last chunk
  scores = rng.integers(0, 40, size=(b, t)).astype(np.float32)  # integer scores: many exact ties
  k = jnp.asarray(rng.normal(size=(b, t, 1, 2)), jnp.float32)
  sel = select(jnp.asarray(scores), k, k, chunk, k_e)
  stores = jax.tree.map(np.asarray, parallel_stores(sel, capacity, StorePolicy(policy)))   # read entry by entry
  k = np.asarray(k)
  for row in range(b):
    chunks = []
    for c in range(n_chunks):
      seg = [(c * chunk + i, scores[row, c * chunk + i]) for i in range(chunk) if c * chunk + i < t]
      chunks.append(sorted(sorted(seg, key=lambda e: (-e[1], e[0]))[:k_e]))   # top-k_e, ties earliest
    before, _ = python_policy(chunks, capacity, policy)
    for c in range(n_chunks):
      got = sorted((int(p), float(s)) for p, s, ok in zip(stores.pos[row, c], stores.score[row, c],
                                                        stores.valid[row, c]) if ok)
      assert got == [(p, float(s)) for p, s in before[c]], (policy, row, c)
      for p, key in zip(stores.pos[row, c], stores.k[row, c]):
        if p != NO_POS:
          np.testing.assert_array_equal(key, k[row, p])


def test_streaming_candidates_equal_chunk_selection():
  rng = np.random.default_rng(1)
  b, chunk, k_e = 3, 16, 4
  scores = rng.integers(0, 6, size=(b, chunk)).astype(np.float32)     # host arrays: sliced with numpy
  k = rng.normal(size=(b, chunk, 1, 2)).astype(np.float32)
  cand = empty_store(b, k_e, 1, 2, jnp.float32)
  for i in range(chunk):
    cand = insert_candidate(cand, scores[:, i], k[:, i], k[:, i], np.int32(i))
  sel = jax.tree.map(lambda x: x[:, 0], jax.device_get(select_per_chunk(scores, k, k, chunk, k_e)))
  cand = by_position(cand)
  for x, y in zip(cand, sel):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("selection", [s.value for s in Selection])
def test_selection_scores_carry_no_gradient_but_the_learned_gate(selection):
  """Every score is a constant to autodiff; only `learned` passes a gradient, through the stored values, to its
  scorer (and to a), and `linear` its auxiliary loss's to its predictor (not to a), while the forward values
  stay the inputs' bit for bit."""
  a = host_normal(20, (2, 8, 4))                    # inputs built on the host: no eager op per shape
  k, v = (host_normal(21 + i, (2, 8, 1, 2)) for i in range(2))
  w_p = np.eye(4, dtype=np.float32) / 4 + 0.1 * host_normal(23, (4, 4, 4))

  def parts(a, w_s, w_p):
    return selection_scores(Selection(selection), ScoreInputs(a, a[..., None, :2], v, k, k, w_s=w_s, w_p=w_p,
                                                              predictor_loss_weight=1.0))

  def grads(part):
    return jax.grad(lambda a, w_s, w_p: jnp.sum(parts(a, w_s, w_p)[part]
                                                * jnp.arange(1, 9.0).reshape(1, 8, *(1,) * part)),
                    argnums=(0, 1, 2))(a, jnp.ones(4), w_p)

  np.testing.assert_array_equal(parts(a, jnp.ones(4), w_p)[1], v)
  for g in grads(0):                         # the scores: a constant to autodiff, for every selection
    np.testing.assert_array_equal(g, 0)
  ga, gw, gp = grads(1)                      # the stored values: a gradient to a and w_s only when learned
  learned, linear = selection == Selection.LEARNED, selection == Selection.LINEAR
  assert (np.abs(gw).max() > 0) == learned and (np.abs(ga).max() > 0) == learned
  assert (np.abs(gp).max() > 0) == linear
