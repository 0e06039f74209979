"""Chunked prefill (`Decoder(prefill_chunk=C)`): a long prompt prefilled in pieces of C tokens, each continuing
the cache of the one before, gives the cache and logits of one whole-prompt prefill, and decoding goes on from
it as from that prefill."""

import jax
import numpy as np
import pytest
from flax import nnx

from bmojo_jax import LanguageModel, continuation, inference
from bmojo_jax.attention import AttnState
from bmojo_jax.inference import Decoder, generate, prefill_pieces
from bmojo_jax.memory.store import Store, by_position
from tests.conftest import FAMILIES, FAMILY_TIERS, host_normal, host_tokens, tiny_config

PROMPT, T = 40, 44         # prompt tokens, then decode to T; tiny_config: memory chunk 4, window 8
# The pieces start at multiples of the memory chunk (4) or not, and the chunk divides the prompt or not:
CHUNKS = [pytest.param(8, id="divides-aligned"), pytest.param(7, id="remainder-unaligned"),
          pytest.param(12, id="remainder-aligned", marks=pytest.mark.slow),
          pytest.param(10, id="divides-unaligned", marks=pytest.mark.slow)]
ATOL = 1e-5                # fp32: the pieces run the same ops in another order (parallel vs step-by-step)
forward = nnx.jit(lambda m, x: m(x))


@pytest.fixture(scope="module")
def models():
  return {f: LanguageModel(tiny_config(f, init_std=0.1, n_layers=4), rngs=nnx.Rngs(0)) for f in FAMILIES}


@jax.jit
def canonical(cache):
  """The cache with every eidetic candidate set in position order: the parallel pass and `insert_candidate`
  hold the same entries in different slots (the store itself is ordered canonically). Jitted: one compile per
  cache structure, not the sort's ops one by one."""
  fix = lambda s: s._replace(cand=by_position(s.cand)) if isinstance(s, AttnState) else s
  return jax.tree.map(fix, cache, is_leaf=lambda s: isinstance(s, AttnState))


def assert_same_cache(got, want):
  """Every leaf of the two caches (host copies, compared with numpy) equal, floats to ATOL."""
  got, want = jax.device_get(canonical(got)), jax.device_get(canonical(want))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, jax.tree_util.keystr(path)
    if np.issubdtype(a.dtype, np.floating):
      np.testing.assert_allclose(a, b, rtol=ATOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_prefill_pieces():
  assert prefill_pieces(40, None) == [(0, 40)] and prefill_pieces(40, 40) == [(0, 40)]
  assert prefill_pieces(40, 8) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40)]
  assert prefill_pieces(40, 12) == [(0, 4), (4, 16), (16, 28), (28, 40)]     # the remainder first
  assert prefill_pieces(1, 12) == [(0, 1)]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("family", FAMILY_TIERS)   # a compile per chunk and family: CI runs every family
def test_chunked_prefill_matches_whole_prefill_and_forward(models, family, chunk):
  """Every position's logits, the cache (every leaf: rings, conv and SSM states, fading buffers, the store and
  the candidates) as one prefill of the whole prompt gives; then steps from it give the forward's logits."""
  check_chunked_prefill(models[family], family, chunk, PROMPT)


@pytest.mark.parametrize("chunk, prompt", [
    pytest.param(1, 14, id="C1"), pytest.param(8, 38, id="2-memory-chunks-prompt-ends-mid-chunk"),
    pytest.param(6, 37, id="unaligned-ends-mid-chunk", marks=pytest.mark.slow)])
def test_bmojo_chunked_prefill_cases(models, chunk, prompt):
  """B'MOJO's pieces continue its memory in parallel at any phase of the memory chunks (L = 4): pieces of one
  token, pieces of two memory chunks, and prompts that end inside a chunk (the last piece's cache then holds a
  chunk's partial candidates)."""
  check_chunked_prefill(models["bmojo"], "bmojo", chunk, prompt)


def check_chunked_prefill(model, family, chunk, prompt):
  decoder = Decoder(model, prefill_chunk=chunk)
  tokens = host_tokens(chunk, (2, T))
  full = np.asarray(forward(model, tokens))
  want_logits, want_cache = Decoder(model).prefill(tokens[:, :prompt], T)
  logits, cache = decoder.prefill(tokens[:, :prompt], T)
  assert logits.shape == want_logits.shape
  np.testing.assert_allclose(logits, want_logits, atol=ATOL)
  np.testing.assert_allclose(logits, full[:, :prompt], atol=1e-4)
  assert_same_cache(cache, want_cache)
  n_stores = sum(int(np.sum(s.valid)) for s in jax.tree.leaves(cache, is_leaf=lambda s: isinstance(s, Store))
                 if isinstance(s, Store))
  assert family != "bmojo" or n_stores > 0                  # the stores and candidates hold entries
  for t in range(prompt, T):
    step_logits, cache = decoder.step(tokens[:, t], cache)
    np.testing.assert_allclose(step_logits, full[:, t], atol=1e-4)
  assert float(np.abs(full).max()) > 0.5                    # the logits are not near-constant


def test_chunked_continuation_and_last_only(models):
  """A sequence continued by a chunked prefill (a second turn) and last_only give what one prefill does."""
  model = models["bmojo"]
  tokens = host_tokens(5, (2, T))
  want, want_cache = Decoder(model).prefill(tokens, T)
  decoder = Decoder(model, prefill_chunk=6)
  _, cache = decoder.prefill(tokens[:, :9], T, chunk=4)              # the call's chunk overrides the decoder's
  last, cache = decoder.prefill(tokens[:, 9:], cache=cache, last_only=True)
  assert last.shape == (2, 1, 64)
  np.testing.assert_allclose(np.asarray(last)[:, 0], np.asarray(want)[:, -1], atol=ATOL)
  assert_same_cache(cache, want_cache)


@pytest.mark.parametrize("family", ["hybrid", "bmojo"])
def test_one_continuation_compile_whatever_the_prompt_length(models, family):
  """Pieces after the first have one shape: prompts of several lengths compile the continuation once (the
  first piece, the remainder, is a parallel prefill compiled per remainder length, as a whole prompt is). For
  B'MOJO the pieces then start at several phases of its memory chunks (`continuation.continue_memory`'s frame)."""
  decoder = Decoder(models[family], prefill_chunk=8)
  decoder.prefill(np.zeros((1, 24), np.int32))
  before = (inference._continue._cache_size(), inference._prefill._cache_size())
  for length in (17, 25, 40, 27):                             # remainders 1, 1, 8 (compiled above), 3
    decoder.prefill(np.ones((1, length), np.int32))
  assert inference._continue._cache_size() == before[0]
  assert inference._prefill._cache_size() == before[1] + 2


def test_generate_with_prefill_chunk(models):
  """generate with prompts of different lengths, the common prefix prefilled in pieces: the same tokens."""
  prompts = [list(range(1, 20)), list(range(30, 43)), [5] * 23]
  want = generate(Decoder(models["bmojo_f"]), prompts, max_new_tokens=5)
  assert generate(Decoder(models["bmojo_f"]), prompts, max_new_tokens=5, prefill_chunk=5) == want
  assert generate(Decoder(models["bmojo_f"], prefill_chunk=4), prompts, max_new_tokens=5) == want


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True, "8"])
def test_bad_prefill_chunk(models, chunk):
  with pytest.raises(ValueError, match="prefill_chunk=.* must be a positive int or None"):
    Decoder(models["mamba"], prefill_chunk=chunk)
  with pytest.raises(ValueError, match="prefill_chunk"):
    Decoder(models["mamba"]).prefill(np.zeros((1, 4), np.int32), chunk=chunk)


def test_full_attention_needs_max_len_for_the_whole_prompt(models):
  """The Transformer's KV cache is sized by the first piece's prefill: max_len is checked against the whole
  prompt before any piece runs."""
  with pytest.raises(ValueError, match=r"max_len >= the prompt length \(20\)"):
    Decoder(models["transformer"], prefill_chunk=8).prefill(np.zeros((1, 20), np.int32), 16)


# The continuations compared, each jitted once for the module (a compile per Attention config and shape):
_stepwise = nnx.jit(continuation.continue_stepwise)                            # the reference
_parallel = nnx.jit(continuation.continue_parallel, static_argnums=3)          # (attn, a, state, block)
_memory = nnx.jit(lambda m, a, s, f: m(a, s, fading=f))                          # Attention.__call__ with a state


@pytest.mark.parametrize("family, start, length, block", [
    ("hybrid", 0, 11, 4), ("hybrid", 5, 7, 7), ("hybrid", 13, 20, 6), ("hybrid", 3, 2, 256),
    ("transformer", 0, 9, 4), ("transformer", 6, 13, 5), ("transformer", 17, 3, 256)])
def test_parallel_continuation_equals_the_step_scan(family, start, length, block):
  """Attention without memory tokens continues a state with all queries at once (in blocks of `block`, which
  does or does not divide the piece; window 8 or full attention over a 40-slot cache): the output and state of
  `step` over the piece's tokens (`continue_stepwise`), the reference."""
  from bmojo_jax.attention import Attention
  cfg = tiny_config(family, init_std=0.1)
  attn = Attention(cfg, rngs=nnx.Rngs(4))
  slots = cfg.window or 40
  x = host_normal(start, (2, start + length, cfg.d_model))
  state = attn.init_state(2, slots) if start == 0 else _prefix_state(attn, x[:, :start], None, slots)
  want_y, want = _stepwise(attn, x[:, start:], state, None)
  got_y, got = _parallel(attn, x[:, start:], state, block)
  want_y = np.asarray(want_y)
  np.testing.assert_allclose(got_y, want_y, atol=ATOL)
  assert_same_cache(got, want)
  assert int(got.pos) == start + length and float(np.abs(want_y).max()) > 0.05


@nnx.jit(static_argnums=3)
def _prefix_state(attn, x, fading, slots):
  """The decode state after the parallel pass over x [B, S, D] (and fading): one compile per S, not the memory
  attention op by op (a compile per op and shape, 20 s of a memory case's 25)."""
  return attn(x, fading=fading, cache_size=slots)[1]


# (start, length): each length and each start past 0 is a compile (of both sides; of `_prefix_state`), so the
# phases of the memory chunks (L 4) come from three lengths and six starts:
MEMORY_CASES = [
    (3, 7),     # from mid-chunk 0 (a history of zeros and inputs, a partial ring), across two boundaries
    (0, 20),    # from the start, five chunks ending on a boundary: the store fills and evicts
    (5, 7),     # from mid-chunk, across a boundary, ending on one (12)
    (5, 1),     # one token mid-chunk
    (7, 1),     # one token completing a chunk
    (8, 1),     # one token from a boundary
    (12, 20),   # several chunks from a boundary past the first frame (its start past 0), ending on one (32)
    (13, 20),   # several chunks from mid-chunk with a full store, ending mid-chunk (33)
]


@pytest.mark.parametrize("family, overrides", [
    ("bmojo", {}), ("bmojo", dict(store_policy="score", n_eidetic=5)),
    pytest.param("bmojo_f", {}, marks=pytest.mark.slow),
    pytest.param("bmojo", dict(selection="ssm_error"), marks=pytest.mark.slow),
    pytest.param("bmojo", dict(selection="linear"), marks=pytest.mark.slow),
    pytest.param("bmojo", dict(selection="learned", store_policy="score"), marks=pytest.mark.slow)])
def test_parallel_memory_continuation_equals_the_step_scan(family, overrides):
  """The memory attention continues a state in one parallel pass (`continue_memory`): the output and state
  (ring, fading buffers, store, candidates, history) of `step` over the piece's tokens (`continue_stepwise`), from the
  sequence start or a state mid-chunk or on a boundary, for pieces of one token up to several chunks, each
  store policy and the selections that read the history or the fading projections (L 4, window 8)."""
  from bmojo_jax.attention import Attention
  cfg = tiny_config(family, init_std=0.1, **overrides)
  attn = Attention(cfg, rngs=nnx.Rngs(4))
  for start, length in MEMORY_CASES:
    x, f = (host_normal(start + i, (2, start + length, cfg.d_model)) for i in (0, 100))
    state = attn.init_state(2, cfg.window) if start == 0 else _prefix_state(attn, x[:, :start], f[:, :start],
                                                                               cfg.window)
    want_y, want = _stepwise(attn, x[:, start:], state, f[:, start:])
    got_y, got = _memory(attn, x[:, start:], state, f[:, start:])
    want_y = np.asarray(want_y)
    np.testing.assert_allclose(got_y, want_y, atol=ATOL, err_msg=f"start {start}, length {length}")
    assert_same_cache(got, want)
    assert int(got.pos) == start + length and float(np.abs(want_y).max()) > 0.05
    assert not cfg.eidetic or start + length < 8 or int(np.sum(got.store.valid)) > 0


@pytest.mark.parametrize("family", ["bmojo", pytest.param("mamba", marks=pytest.mark.slow)])
def test_chunked_prefill_memory_does_not_grow_with_the_prompt(models, family):
  """The largest temporary buffer of the compiled pieces (XLA's buffer assignment) is the same at T 64 and
  256 in pieces of 16, and below that of one pass over 256 tokens."""
  from benchmarks.speed.inference_bench import prefill_temp_bytes
  decoder = Decoder(models[family])
  chunked = [prefill_temp_bytes(decoder, t, 16) for t in (64, 256)]
  whole = prefill_temp_bytes(decoder, 256)
  assert chunked[0] == chunked[1] and 0 < chunked[1] < whole / 4, (chunked, whole)
