"""Decoding token by token reproduces the parallel pass; generation, sampling and the compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bmojo_jax import LanguageModel
from bmojo_jax.config import Selection
from bmojo_jax import inference
from bmojo_jax.inference import Decoder, cache_bytes, generate, generate_stream, sample
from tests.conftest import FAMILIES, FAMILY_TIERS, host_normal, host_tokens, jaxpr_eqns, tiny_config

T = 42  # > 10 chunks of 4: the FIFO store (2 chunks) fills and evicts many times
forward = nnx.jit(lambda m, x: m(x))   # the parallel pass, compiled once per model for the module


@pytest.fixture(scope="module")
def decoders():
  out = {}
  for family in FAMILIES:
    model = LanguageModel(tiny_config(family, init_std=0.1, n_layers=4), rngs=nnx.Rngs(0))
    out[family] = (model, Decoder(model))
  return out


# Each prefill length is a compile per family: the inner loop takes one token and one past the window (8) in
# the middle of a chunk, for B'MOJO and the Transformer (conftest.FAMILY_TIERS); a partial first chunk (5), a
# prompt of exactly the window (8) and every family run in CI.
@pytest.mark.parametrize("prefill_len", [1, pytest.param(5, marks=pytest.mark.slow),
                                         pytest.param(8, marks=pytest.mark.slow), 13])
@pytest.mark.parametrize("family", FAMILY_TIERS)
def test_decode_matches_parallel(decoders, family, prefill_len):
  model, decoder = decoders[family]
  tokens = host_tokens(prefill_len, (2, T))
  full = np.asarray(forward(model, tokens))            # host copies: the checks are numpy, not eager XLA ops
  logits, cache = decoder.prefill(tokens[:, :prefill_len], T)
  assert np.abs(np.asarray(logits) - full[:, :prefill_len]).max() <= 1e-4
  worst = 0.0
  for t in range(prefill_len, T):
    step_logits, cache = decoder.step(tokens[:, t], cache)
    worst = max(worst, float(np.abs(np.asarray(step_logits) - full[:, t]).max()))
  assert worst <= 1e-4, worst
  assert float(np.abs(full).max()) > 0.5  # logits are not near-constant: the comparison has teeth


@pytest.mark.parametrize("selection", [s.value if s == Selection.INNOVATION else
                                       pytest.param(s.value, marks=pytest.mark.slow) for s in Selection])
def test_score_policy_decode_matches_parallel(selection):
  """The score store under every selection score (tests/test_selection.py: the FIFO store)."""
  model = LanguageModel(tiny_config("bmojo", init_std=0.1, store_policy="score", selection=selection),
                        rngs=nnx.Rngs(3))
  tokens = host_tokens(9, (2, T))
  full = np.asarray(forward(model, tokens))
  decoder = Decoder(model)
  logits, cache = decoder.prefill(tokens[:, :6], T)
  for t in range(6, T):
    step_logits, cache = decoder.step(tokens[:, t], cache)
    np.testing.assert_allclose(step_logits, full[:, t], atol=1e-4)


def test_step_compiles_once(decoders):
  _, decoder = decoders["bmojo"]
  tokens = np.zeros((2, 20), np.int32)
  _, cache = decoder.prefill(tokens[:, :3], 20)
  _, cache = decoder.step(tokens[:, 3], cache)
  before = inference._step._cache_size()
  for t in range(4, 20):
    _, cache = decoder.step(tokens[:, t], cache)
  assert inference._step._cache_size() == before


def test_generate_batches_prompts_of_different_lengths(decoders):
  model, decoder = decoders["bmojo"]
  prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7], [5] * 14]
  out = generate(decoder, prompts, max_new_tokens=5)
  # Greedy: each new token is the argmax of the parallel pass over everything before it. One pass (one compile)
  # for the three rows, zero-padded on the right, which a causal model cannot look back at.
  rows = [prompt + new for prompt, new in zip(prompts, out)]
  padded = np.array([row + [0] * (max(map(len, rows)) - len(row)) for row in rows], np.int32)
  logits = np.asarray(forward(model, padded))
  for i, (prompt, new) in enumerate(zip(prompts, out)):
    assert len(new) == 5 and np.argmax(logits[i, len(prompt) - 1:len(prompt) + 4], -1).tolist() == new


def test_generate_rejects_bad_prompts(decoders):
  _, decoder = decoders["hybrid"]
  with pytest.raises(ValueError, match=r"span \[0, 64\] but the model's vocab_size is 64"):
    generate(decoder, [[0, 64]], max_new_tokens=2)
  with pytest.raises(ValueError, match="at least one token"):
    generate(decoder, [[]], max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p"):
    generate(decoder, [[1]], max_new_tokens=2, temperature=1.0, top_p=1.5)


def test_sampling_restricts_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.key(0)
  greedy = sample(logits, keys)
  assert np.all(np.asarray(greedy) == 0)
  top2 = np.asarray(sample(logits, keys, temperature=1.0, top_k=2))
  assert set(top2.tolist()) == {0, 1}
  nucleus = np.asarray(sample(logits, keys, temperature=1.0, top_p=0.7))   # 0.5 + 0.3 reaches 0.7
  assert set(nucleus.tolist()) == {0, 1}
  counts = np.bincount(np.asarray(sample(logits, keys, temperature=1.0)), minlength=4) / 2000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_cache_is_constant_except_full_attention():
  for family in ("mamba", "hybrid", "bmojo_f", "bmojo"):
    model = nnx.eval_shape(lambda: LanguageModel(tiny_config(family), rngs=nnx.Rngs(0)))
    assert cache_bytes(model, 1, 1_000) == cache_bytes(model, 1, 64_000)
  model = nnx.eval_shape(lambda: LanguageModel(tiny_config("transformer"), rngs=nnx.Rngs(0)))
  assert cache_bytes(model, 1, 64_000) > 50 * cache_bytes(model, 1, 1_000)


def test_scanned_decode_equals_step_loop(decoders):
  _, decoder = decoders["bmojo"]
  prompt = host_tokens(5, (2, 6))
  logits, cache = decoder.prefill(prompt, 30)
  tokens, last_logits, _ = decoder.decode(logits[:, -1], cache, 12)
  logits, cache = decoder.prefill(prompt, 30)
  logits, want = logits[:, -1], []
  for _ in range(12):
    token = np.argmax(np.asarray(logits), -1).astype(np.int32)       # greedy, on the host
    want.append(token)
    logits, cache = decoder.step(token, cache)
  np.testing.assert_array_equal(tokens, np.stack(want, 1))
  np.testing.assert_allclose(last_logits, logits, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_TIERS)   # a prefill compile per piece length and family
def test_prefill_in_pieces_matches_parallel(decoders, family):
  """A prompt fed in pieces of random lengths (chunk phases anywhere), then decoding, equals one parallel pass."""
  model, decoder = decoders[family]
  tokens = host_tokens(11, (2, T))
  full = forward(model, tokens)
  # Pieces of 3, 1, 7, 7, 1, 11 tokens, then decode: shorter than a chunk, across chunks, longer than the window
  # (8), starting at chunk phases 0, 2 and 3; three continuation lengths, a compile each.
  cuts = [0, 3, 4, 11, 18, 19, 30]
  logits, cache = decoder.prefill(tokens[:, :cuts[1]], T)
  got = [logits]
  for lo, hi in zip(cuts[1:-1], cuts[2:]):
    logits, cache = decoder.prefill(tokens[:, lo:hi], cache=cache)
    got.append(logits)
  for t in range(cuts[-1], T):
    logits, cache = decoder.step(tokens[:, t], cache)
    got.append(logits[:, None])
  np.testing.assert_allclose(np.concatenate([np.asarray(g) for g in got], axis=1), full, atol=1e-4)


def test_prefill_continuation_past_the_kv_cache_is_refused(decoders):
  _, decoder = decoders["transformer"]
  _, cache = decoder.prefill(np.zeros((2, 10), np.int32), 12)
  with pytest.raises(ValueError, match="KV cache holds 12 tokens"):
    decoder.prefill(np.zeros((2, 3), np.int32), cache=cache)


def test_model_prefill_continuation_past_the_kv_cache_is_refused(decoders):
  model, _ = decoders["transformer"]
  _, cache = model.prefill(np.zeros((2, 10), np.int32), 12)
  with pytest.raises(ValueError, match="KV cache holds 12 tokens"):
    model.prefill(np.zeros((2, 3), np.int32), cache=cache)


def test_stream_equals_generate_for_prompts_of_different_lengths(decoders):
  """Streamed in blocks of 3 steps (the first blocks still inside the longer prompts), sampling or greedy, with
  an eos that stops one row early: the same tokens as one `generate` call."""
  _, decoder = decoders["bmojo"]
  prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7], [5] * 14]
  for kw in (dict(), dict(temperature=1.0, top_k=20, seed=3)):
    want = generate(decoder, prompts, max_new_tokens=7, **kw)
    blocks = list(generate_stream(decoder, prompts, max_new_tokens=7, block=3, **kw))
    assert [sum((b[i] for b in blocks), []) for i in range(3)] == want
    assert blocks[0][2] == []                                   # row 2 is still in its prompt
    eos = want[1][2]
    cut = generate(decoder, prompts, max_new_tokens=7, eos_id=eos, **kw)
    streamed = [sum((b[i] for b in generate_stream(decoder, prompts, max_new_tokens=7, block=3, eos_id=eos,
                                                  **kw)), []) for i in range(3)]
    assert streamed == cut and cut[1] == want[1][:want[1].index(eos) + 1]


def test_decoder_is_freed():
  """The compiled functions hold no decoder (nor its parameters): deleting the last reference frees it."""
  import gc
  import weakref
  model = LanguageModel(tiny_config("hybrid"), rngs=nnx.Rngs(0))
  decoder = Decoder(model)
  generate(decoder, [[1, 2, 3]], max_new_tokens=2)
  ref, params = weakref.ref(decoder), weakref.ref(jax.tree.leaves(decoder.state)[0])
  del decoder, model
  gc.collect()
  assert ref() is None and params() is None


@pytest.mark.parametrize("family", ["transformer", "bmojo"])
def test_scanned_prefill_matches_the_block_loop(decoders, family):
  """Decoder(scan_prefill=True) prefills with the blocks in one lax.scan and decodes as the loop does."""
  model, decoder = decoders[family]
  scanned = Decoder(model, scan_prefill=True)
  tokens = host_tokens(2, (2, 20))
  (want, cache_a), (got, cache_b) = (d.prefill(tokens[:, :13], 20) for d in (decoder, scanned))
  np.testing.assert_allclose(got, want, atol=1e-5)
  for t in range(13, 20):
    (want, cache_a), (got, cache_b) = decoder.step(tokens[:, t], cache_a), scanned.step(tokens[:, t], cache_b)
    np.testing.assert_allclose(got, want, atol=1e-5)


GUARDS = ("cond", "while")   # primitives that run their body on a device predicate (`lax.scan` is "scan")


def _count(jaxpr, name: str) -> dict[bool, int]:
  """{False: `name` equations outside any conditional or while loop, True: inside one} of a jaxpr and the jaxprs
  it calls."""
  found = {False: 0, True: 0}
  for eqn, guarded in jaxpr_eqns(jaxpr, GUARDS):
    found[guarded] += eqn.primitive.name == name
  return found


def test_step_merges_the_store_only_at_a_chunk_boundary(decoders):
  """The store merge (a sort over M_e + k_e entries per layer) runs under a condition on the chunk boundary: a
  token inside a chunk does only its own work, in the step and in the on-device loop. Tracing only."""
  _, decoder = decoders["bmojo"]
  cache = decoder.prefill(np.zeros((1, 5), np.int32), 20)[1]
  token, logits = np.zeros((1,), np.int32), np.zeros((1, 64), np.float32)
  step = jax.make_jaxpr(inference._step, static_argnums=(0,))(decoder.graphdef, decoder.state, token, cache)
  loop = jax.make_jaxpr(inference._decode_loop, static_argnums=(0, 8, 9, 10))(
      decoder.graphdef, decoder.state, logits, cache, np.zeros((1, 3), np.int32), np.zeros((1, 3), bool),
      jax.random.key(0), np.int32(0), 0.0, None, None)
  n_blocks = decoder.cfg.n_blocks
  for jaxpr in (step, loop):
    assert _count(jaxpr.jaxpr, "sort") == {False: 0, True: n_blocks}


@pytest.mark.parametrize("policy", ["fifo", "score"])
def test_step_equals_its_branch_free_reference(policy):
  """`Attention.step` (the chunk-boundary work under `run_if`) gives `step_select`'s outputs and state over
  several chunks (stores filling and evicting), with fading and eidetic tokens: the integer and boolean leaves
  (positions, valid flags) exactly; the floats to fp32 rounding (the boundary work only moves data, but the token's
  work is compiled in two programs, which may fuse it differently), each within 1e-6 of its largest entry, where
  a merge at the wrong token moves whole entries."""
  from bmojo_jax.attention import Attention
  cfg = tiny_config("bmojo", init_std=0.1, store_policy=policy)
  attn = Attention(cfg, rngs=nnx.Rngs(1))
  a, fading = host_normal(2, (2, 2, 26, cfg.d_model))
  run = nnx.jit(lambda m, a, f, s, select: (m.step_select if select else m.step)(a, s, fading=f),
                static_argnums=(4,))
  states = [attn.init_state(2, cfg.window)] * 2
  for t in range(26):
    (y0, states[0]), (y1, states[1]) = (run(attn, a[:, t:t + 1], fading[:, t:t + 1], s, sel)
                                        for s, sel in zip(states, (False, True)))
    for x0, x1 in zip([y0, *jax.tree.leaves(states[0])], [y1, *jax.tree.leaves(states[1])]):
      x0, x1 = np.asarray(x0), np.asarray(x1)
      if np.issubdtype(x0.dtype, np.floating):
        scale = np.abs(x1[np.isfinite(x1)]).max(initial=0)      # empty store slots score -inf: matched exactly
        np.testing.assert_allclose(x0, x1, rtol=0, atol=1e-6 * max(float(scale), 1e-30))
      else:
        np.testing.assert_array_equal(x0, x1)
  assert int(np.sum(states[0].store.valid)) == 2 * cfg.eidetic   # the stores filled: the merges ran


@pytest.mark.parametrize("family", FAMILY_TIERS)   # four compiles a family
def test_decoder_reads_matmul_weights_in_the_compute_dtype(family):
  """fp32 parameters, bf16 compute: the decoder holds its matmul weights in bf16 (half the bytes a token reads)
  and the rest as stored, and its prefill and steps give the logits of the model's own fp32 weights, bit for
  bit (every use casts those weights to the compute dtype)."""
  model = LanguageModel(tiny_config(family, init_std=0.1, compute=dict(dtype="bfloat16")), rngs=nnx.Rngs(0))
  decoder = Decoder(model)
  dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(decoder.state)}
  assert {d for p, d in dtypes.items() if "kernel" in p or "embed" in p} == {jnp.dtype("bfloat16")}
  assert {d for p, d in dtypes.items() if "scale" in p} == {jnp.dtype("float32")}
  graphdef, state = nnx.split(model)
  for (path, held), own in zip(jax.tree_util.tree_leaves_with_path(decoder.state), jax.tree.leaves(state)):
    name = jax.tree_util.keystr(path)
    cast = jnp.bfloat16 if "kernel" in name or "embed" in name else own.dtype
    np.testing.assert_array_equal(np.asarray(held), np.asarray(own).astype(cast), err_msg=name)
  tokens = host_tokens(1, (2, 9))
  got, cache = decoder.prefill(tokens[:, :5], 9)
  want, want_cache = inference._prefill(graphdef, state, tokens[:, :5], 9, False, 0)
  np.testing.assert_array_equal(got, want)
  for t in range(5, 9):
    got, cache = decoder.step(tokens[:, t], cache)
    want, want_cache = inference._step(graphdef, state, tokens[:, t], want_cache)
    np.testing.assert_array_equal(got, want)
  assert float(np.abs(np.asarray(want)).max()) > 0.1


def test_decoder_compiler_options(decoders, tmp_path):
  """None and {} decode with jax's default jitted step and loop; given options reach the step's and the loop's
  compiles (xla_dump_to: XLA writes their modules where it is told) and leave the tokens as they were."""
  model, default = decoders["bmojo"]
  for options in (None, {}):
    decoder = Decoder(model, compiler_options=options)
    assert decoder.compiler_options == () and decoder._step_fn is inference._step
  dump = tmp_path / "xla"
  dumped = Decoder(model, compiler_options={"xla_dump_to": str(dump)})
  assert "_step" not in " ".join(p.name for p in dump.iterdir())   # the check compiled a one-op function only
  prompt = np.array([[3, 1, 4, 1, 5]], np.int32)
  want = generate(default, prompt, max_new_tokens=6)
  assert generate(dumped, prompt, max_new_tokens=6) == want
  logits, cache = dumped.prefill(prompt, 12, last_only=True)
  dumped.step(np.argmax(np.asarray(logits)[:, -1], -1).astype(np.int32), cache)
  names = " ".join(p.name for p in dump.iterdir())
  assert "_decode_loop" in names and "jit__step" in names, names


@pytest.mark.parametrize("options, match", [
    ({"xla_no_such_option": True}, "No such compile option: 'xla_no_such_option'"),
    ({"xla_cpu_enable_fast_math": "maybe"}, "'maybe' is not a valid bool"),
    ({"xla_dump_to": ["a"]}, "values must be str, bool, int or float"),
    (["xla_dump_to"], "must map XLA option names")])
def test_decoder_rejects_bad_compiler_options(decoders, options, match):
  model, _ = decoders["hybrid"]
  with pytest.raises(ValueError, match=match):
    Decoder(model, compiler_options=options)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_step_has_one_condition_for_all_layers(scan_layers):
  """A B'MOJO decode step enters the memory chunk of every layer under one condition (`LanguageModel.enter_chunk`):
  one while loop of zero or one trips (`attention.run_if`) whatever the depth (XLA:GPU waits on the host for each
  loop or conditional) and no conditional (XLA:GPU copies every array a conditional returns unchanged); the
  sublayers' steps add none. The Transformer's step has neither."""
  for family, want in (("bmojo", 1), ("transformer", 0)):
    model = LanguageModel(tiny_config(family, n_layers=6, compute=dict(scan_layers=scan_layers)), rngs=nnx.Rngs(0))
    cache = model.init_cache(1, 16)
    jaxpr = jax.make_jaxpr(lambda t, c: model.step(t, c))(jnp.zeros((1,), jnp.int32), cache).jaxpr
    whiles, conds = (sum(_count(jaxpr, name).values()) for name in ("while", "cond"))
    assert (whiles, conds) == (want, 0), (family, scan_layers)
