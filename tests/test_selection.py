"""Selection variants (`Selection`, issue #15): each score against a direct numpy computation, and every variant
through the parallel pass, packed rows, the Pallas kernel, scanned layers and token-by-token decoding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bmojo_jax import LanguageModel, count_params
from bmojo_jax.config import Selection
from bmojo_jax.inference import Decoder
from bmojo_jax.memory.scoring import (SELECTION_SCORES, ScoreInputs, innovation_scores, input_norm_scores, last_inputs,
                                      learned_scores, linear_scores, predictor_loss, predictor_taps, selection_scores,
                                      ssm_error_scores, straight_through_values)
from bmojo_jax.memory.selection import select_per_chunk
from bmojo_jax.model import stack_blocks
from tests.conftest import host_normal, host_tokens, tiny_config
from tests.test_packing import _check_packed_equals_alone

SELECTIONS = [s.value for s in Selection]
T = 42  # > 10 chunks of 4: the FIFO store (2 chunks) fills and evicts many times


def _loss_and_grads(model, tokens):
  def loss_fn(m):
    logits = m(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
  return nnx.jit(lambda m: nnx.value_and_grad(loss_fn)(m))(model)


# ------------------------------------------------------------------------------------------- definitions
def test_input_norm_definition():
  a = host_normal(0, (2, 7, 5))
  np.testing.assert_allclose(input_norm_scores(a), np.sum(np.asarray(a) ** 2, -1), rtol=1e-6)


def test_ssm_error_definition():
  """e_t = ‖k_t − fk_{t-1}‖² + ‖v_t − fv_{t-1}‖²; fk_{-1} from `prev` (else zeros), zeros where reach is 0."""
  k, v, fk, fv = (host_normal(10 + i, (2, 9, 2, 3)) for i in range(4))
  prev_k, prev_v = (host_normal(20 + i, (2, 1, 2, 3)) for i in range(2))
  reach = np.asarray([[0, 1, 2, 0, 1, 2, 3, 4, 5]] * 2, np.int32)
  n = lambda x: np.asarray(x, np.float64)
  for prev, r in (((None, None), None), ((prev_k, prev_v), None), ((prev_k, prev_v), reach)):
    got = ssm_error_scores(k, v, fk, fv, *prev, reach=r)
    want = np.zeros((2, 9))
    for t in range(9):
      if t == 0:
        before = [np.zeros((2, 2, 3)) if p is None else n(p)[:, 0] for p in prev]
      else:
        before = [n(fk)[:, t - 1], n(fv)[:, t - 1]]
      if r is not None and r[0, t] == 0:
        before = [np.zeros((2, 2, 3))] * 2
      want[:, t] = ((n(k)[:, t] - before[0]) ** 2).sum((1, 2)) + ((n(v)[:, t] - before[1]) ** 2).sum((1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_learned_definition_and_straight_through():
  """s_t = a_t · w_s; the gate leaves the values bit-identical and passes σ'(s) ⟨g, v⟩ to the score."""
  a, w = host_normal(30, (2, 6, 5)), host_normal(31, (5,))
  v, g = host_normal(32, (2, 6, 2, 3)), host_normal(33, (2, 6, 2, 3))
  s = learned_scores(a, w)
  np.testing.assert_allclose(s, np.asarray(a) @ np.asarray(w), rtol=1e-5)
  np.testing.assert_array_equal(straight_through_values(v, s), v)
  ds = jax.grad(lambda s: jnp.sum(straight_through_values(v, s) * g))(s)
  sig = jax.nn.sigmoid(s)
  np.testing.assert_allclose(ds, sig * (1 - sig) * np.sum(v * g, axis=(-2, -1)), rtol=1e-5)


def test_linear_definition():
  """e_t = ‖a_t − Σ_j a_{t-j} W_j‖² with the history before the sequence (else zeros) and zeros where reach < j;
  at W = I/4 it is the innovation test."""
  a, history = host_normal(40, (2, 9, 5)), host_normal(41, (2, 4, 5))
  w = host_normal(42, (4, 5, 5))
  reach = np.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3]] * 2, np.int32)
  n = lambda x: np.asarray(x, np.float64)
  for h, r in ((None, None), (history, None), (history, reach)):
    full = np.concatenate([np.zeros((2, 4, 5)) if h is None else n(h), n(a)], axis=1)
    want = np.zeros((2, 9))
    for t in range(9):
      pred = sum(full[:, 4 + t - j] @ n(w)[j - 1] * (1 if r is None or r[0, t] >= j else 0) for j in range(1, 5))
      want[:, t] = ((n(a)[:, t] - pred) ** 2).sum(-1)
    np.testing.assert_allclose(linear_scores(a, w, h, r), want, rtol=1e-5)
  moving_average = np.broadcast_to(np.eye(5, dtype=np.float32) / 4, (4, 5, 5))
  np.testing.assert_allclose(linear_scores(a, moving_average, history, reach), innovation_scores(a, history, reach),
                             rtol=1e-5, atol=1e-6)


@jax.jit
def _predictor_grad(w, a):
  """λ ∂/∂W of the auxiliary loss (λ = 0.5) of one layer's inputs a [B, T, D], compiled once (not op by op)."""
  return jax.grad(lambda w: 0.5 * predictor_loss(a, predictor_taps(a), w))(w)


def test_linear_predictor_trains_on_its_auxiliary_loss_only():
  """The predictor W of each layer gets λ ∂/∂W Σ_t ‖a_t − â_t‖² / D on top of nothing else (the memory's
  selection has no gradient); every other parameter's gradient and the loss are those of λ = 0: the auxiliary
  loss does not reach the model."""
  cfg = tiny_config("bmojo", init_std=0.1, n_layers=4, selection="linear", predictor_loss_weight=0.5)
  tokens = host_tokens(9, (2, 21))
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  off = LanguageModel(cfg.replace(predictor_loss_weight=0.0), rngs=nnx.Rngs(0))
  loss, grads = _loss_and_grads(model, tokens)
  loss_off, grads_off = _loss_and_grads(off, tokens)
  np.testing.assert_allclose(float(loss), float(loss_off), rtol=1e-6)   # two programs: see the gradients below
  grads, grads_off = jax.device_get((nnx.to_pure_dict(grads), nnx.to_pure_dict(grads_off)))   # host copies
  from bmojo_jax.probe import attention_inputs  # pylint: disable=g-import-not-at-top
  for i, (attn, a, _) in enumerate(attention_inputs(model, tokens)):
    want = _predictor_grad(attn.predictor[...], np.asarray(a, np.float32))
    np.testing.assert_allclose(grads["blocks"][i]["mixer2"]["predictor"], want, rtol=1e-4, atol=1e-7)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_array_equal(grads_off["blocks"][i]["mixer2"]["predictor"], 0)
    grads["blocks"][i]["mixer2"].pop("predictor"), grads_off["blocks"][i]["mixer2"].pop("predictor")
  # The two programs differ (the auxiliary loss's graph changes how XLA fuses the shared parts), so the other
  # gradients agree to fp32 rounding, each leaf within 1e-6 of its largest entry (measured: 3.4e-7), not bit for
  # bit; a leak of the auxiliary loss would be of the order of the gradients themselves.
  for (path, g), g_off in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_off)):
    assert np.isfinite(g).all() and np.isfinite(g_off).all(), jax.tree_util.keystr(path)
    assert float(np.max(np.abs(g_off))) > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(g, g_off, rtol=0, atol=1e-6 * float(np.max(np.abs(g_off))),
                               err_msg=jax.tree_util.keystr(path))
  assert count_params(cfg) == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count_params(cfg) == count_params(cfg.replace(selection="innovation")) + 2 * 4 * 32 * 32


def test_selection_scores_dispatch():
  """One enum picks the function; the default is the paper's innovation, bit for bit, without gradient."""
  a = host_normal(50, (2, 9, 4))
  k, v, fk = (host_normal(51 + i, (2, 9, 1, 2)) for i in range(3))
  x = ScoreInputs(a, k, v, fk, fk, w_s=np.eye(4, dtype=np.float32)[2])   # one-hot: the dot adds exact zeros
  assert set(SELECTION_SCORES) == set(Selection)
  assert tiny_config("bmojo").selection == Selection.INNOVATION
  scores, values = selection_scores(Selection.INNOVATION, x)
  np.testing.assert_array_equal(scores, innovation_scores(a))
  assert values is v
  np.testing.assert_array_equal(selection_scores(Selection.INPUT_NORM, x)[0], input_norm_scores(a))
  np.testing.assert_array_equal(selection_scores(Selection.LEARNED, x)[0], a[..., 2])
  np.testing.assert_array_equal(selection_scores(Selection.SSM_ERROR, x)[0], ssm_error_scores(k, v, fk, fk))
  np.testing.assert_array_equal(last_inputs(a), np.asarray(a, np.float32)[:, -4:])          # T = 9 >= 4
  np.testing.assert_array_equal(last_inputs(a[:, :2]),                                    # fewer: zeros first
                                np.concatenate([np.zeros((2, 2, 4), np.float32), np.asarray(a[:, :2])], 1))


# ------------------------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def models():
  """One model per selection; the linear predictor moved off its initial I/4 (where it is the innovation test)."""
  out = {s: LanguageModel(tiny_config("bmojo", init_std=0.1, n_layers=4, selection=s), rngs=nnx.Rngs(0))
         for s in SELECTIONS}
  for i in range(out["linear"].cfg.n_blocks):
    attn = out["linear"].blocks[i].mixer2
    attn.predictor[...] += 0.1 * jax.random.normal(jax.random.key(10 + i), attn.predictor.shape)
  return out


@pytest.fixture(scope="module")
def decoders(models):
  """One Decoder per model: its prefill and step compile once for the module, not once per test."""
  return {s: Decoder(m) for s, m in models.items()}


forward = nnx.jit(lambda m, x: m(x))   # one compile per model for the module


@nnx.jit
def _chunk_selections(attn, a, fading):
  """One attention sublayer's selections of its input a [B, T, D]: positions [B, C, k_e] (compiled once per
  selection, not run op by op)."""
  cfg = attn.cfg
  k, v = attn.wk(a), attn.wv(a)
  scores, _ = selection_scores(cfg.selection, attn.score_inputs(a, k, v, attn.wk(fading), attn.wv(fading)))
  return select_per_chunk(scores, k, v, cfg.chunk, cfg.eidetic_per_chunk).pos


def _selected_positions(model, tokens):
  """Chunk selections of the first attention sublayer: positions [B, C, k_e] (the parallel pass's)."""
  from bmojo_jax.probe import attention_inputs  # pylint: disable=g-import-not-at-top
  return np.asarray(_chunk_selections(*attention_inputs(model, tokens)[0]))


@pytest.mark.slow   # the benchmark's layer-by-layer pass and the selections compiled for the five models
def test_variants_select_differently(models):
  tokens = host_tokens(4, (2, T))
  picks = {s: _selected_positions(m, tokens) for s, m in models.items()}
  for i, s in enumerate(SELECTIONS):
    for other in SELECTIONS[i + 1:]:
      assert (picks[s] != picks[other]).any(), (s, other)


@pytest.mark.parametrize("selection, prefill_len", [
    *((s, 1) for s in SELECTIONS),
    # a prompt past the first chunk: in the inner loop for the scores that carry state from prefill into the
    # steps (ssm_error's previous read-out, learned's scorer); CI runs every selection
    *(pytest.param(s, 6, marks=() if s in ("ssm_error", "learned", "linear") else pytest.mark.slow)
      for s in SELECTIONS),
])
def test_decode_matches_parallel(models, decoders, selection, prefill_len):
  model, decoder = models[selection], decoders[selection]
  tokens = host_tokens(prefill_len, (2, T))
  full = np.asarray(forward(model, tokens))
  logits, cache = decoder.prefill(tokens[:, :prefill_len], T)
  got = [logits]
  for t in range(prefill_len, T):
    step_logits, cache = decoder.step(tokens[:, t], cache)
    got.append(step_logits[:, None])
  np.testing.assert_allclose(np.concatenate(jax.device_get(got), 1), full, atol=1e-5)
  assert float(np.abs(full).max()) > 0.5


@pytest.mark.parametrize("selection", ["ssm_error", "learned", "linear"])
def test_prefill_in_pieces_matches_parallel(models, decoders, selection):
  """A continuation steps through its piece: ssm_error's previous read-out and linear's history cross the pieces'
  boundaries. The prompt's 6 tokens are test_decode_matches_parallel's prefill; then four pieces of one length
  (one continuation compile), longer than the window, starting at chunk phases 2, 3, 0, 1."""
  model, decoder = models[selection], decoders[selection]
  tokens = host_tokens(11, (2, T))
  full = forward(model, tokens)
  logits, cache = decoder.prefill(tokens[:, :6], T)
  got = [logits]
  for lo, hi in ((6, 15), (15, 24), (24, 33), (33, T)):
    logits, cache = decoder.prefill(tokens[:, lo:hi], cache=cache)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(jax.device_get(got), 1), full, atol=1e-5)


def test_learned_scorer_gets_gradients_from_the_loss(models):
  model = models["learned"]
  tokens = host_tokens(5, (4, T))
  _, grads = _loss_and_grads(model, tokens)
  for i in range(model.cfg.n_blocks):
    g = np.asarray(grads.blocks[i].mixer2.scorer[...])
    assert g.shape == (model.cfg.d_model,) and np.abs(g).max() > 1e-6, (i, g)
  assert count_params(model.cfg) == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count_params(model.cfg) == count_params(model.cfg.replace(selection="innovation")) + 2 * 32


# Two compiles a selection: the inner loop runs the scores whose state or gradient crosses tokens (ssm_error's
# previous read-out, linear's history, learned's scorer); input_norm, a function of each token alone, runs in CI.
@pytest.mark.parametrize("selection", ["learned", "ssm_error", pytest.param("input_norm", marks=pytest.mark.slow),
                                       "linear"])
def test_packed_row_equals_documents_alone(selection):
  """Scores restart per document (ssm_error's previous read-out, innovation's and linear's history) like the
  paper's. The linear predictor's auxiliary loss counts every position of a row, the zeros after a document run
  alone too, so its gradient is left out here (weight 0); `test_linear_definition` checks the restart of its
  taps, `test_linear_predictor_trains_on_its_auxiliary_loss_only` its gradient. One block: the scores restart in
  each attention sublayer, and a score that leaks across documents shows in that block's logits already
  (tests/test_packing.py runs two blocks of every family)."""
  extra = {"predictor_loss_weight": 0.0} if selection == "linear" else {}
  _check_packed_equals_alone(tiny_config("bmojo", init_std=0.1, selection=selection,
                                         compute=dict(scan_impl="sequential"), **extra))


def test_pallas_kernel_consumes_the_same_memory():
  """The kernel (interpret mode) takes the selected memory as input: logits and gradients as the reference."""
  cfg = tiny_config("bmojo", init_std=0.1, selection="learned", compute=dict(scan_impl="sequential"))
  tokens = host_tokens(6, (2, 24))
  ref = LanguageModel(cfg.with_compute(attn_impl="reference"), rngs=nnx.Rngs(0))
  pal = LanguageModel(cfg.with_compute(attn_impl="pallas"), rngs=nnx.Rngs(0))
  loss_a, grads_a = _loss_and_grads(ref, tokens)
  loss_b, grads_b = _loss_and_grads(pal, tokens)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  chex.assert_trees_all_close(nnx.to_pure_dict(grads_a), nnx.to_pure_dict(grads_b), rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(grads_b.blocks[0].mixer2.scorer[...])).max() > 1e-6


@pytest.mark.slow   # four compiles (loop and scanned gradients, prefill, step); tests/test_model.py scans B'MOJO
def test_scanned_layers(models):
  """scan_layers=True stacks the scorer with the other weights: same loss and gradients, and decoding from the
  scanned cache matches its parallel pass."""
  loop = models["learned"]
  scanned = nnx.eval_shape(lambda: LanguageModel(loop.cfg.with_compute(scan_layers=True), rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(scanned, nnx.Param)
  nnx.replace_by_pure_dict(params, stack_blocks(nnx.to_pure_dict(nnx.state(loop, nnx.Param))))
  scanned = nnx.merge(graphdef, params)
  tokens = host_tokens(7, (2, 21))
  with jax.default_matmul_precision("highest"):
    loss_a, grads_a = _loss_and_grads(loop, tokens)
    loss_b, grads_b = _loss_and_grads(scanned, tokens)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  chex.assert_trees_all_close(stack_blocks(nnx.to_pure_dict(grads_a)), nnx.to_pure_dict(grads_b), rtol=1e-5,
                              atol=1e-7)
  full = forward(scanned, tokens)
  decoder = Decoder(scanned)             # the model's prefill and step, compiled (eager: op by op, per token)
  logits, cache = decoder.prefill(tokens[:, :3], 21)
  got = [logits]
  for t in range(3, 21):
    step_logits, cache = decoder.step(tokens[:, t], cache)
    got.append(step_logits[:, None])
  np.testing.assert_allclose(np.concatenate(jax.device_get(got), 1), full, atol=1e-5)


def test_every_token_competes():
  """k_e = chunk with the score store: every token of a chunk is a candidate and the store keeps the M_e best
  seen (M_e = 6 need not be a multiple of k_e = 4 under the score policy): decoding = the parallel pass, and a
  packed row = its documents alone. One block (each compile half of two blocks'): the store is per attention
  sublayer, and T = 42 still fills and evicts it many times."""
  cfg = tiny_config("bmojo", init_std=0.1, eidetic_per_chunk=4, n_eidetic=6, store_policy="score",
                    compute=dict(scan_impl="sequential"))
  assert cfg.eidetic_per_chunk == cfg.chunk
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  tokens = host_tokens(12, (2, T))
  full = forward(model, tokens)
  decoder = Decoder(model)
  logits, cache = decoder.prefill(tokens[:, :5], T)
  got = [logits]
  for t in range(5, T):
    step_logits, cache = decoder.step(tokens[:, t], cache)
    got.append(step_logits[:, None])
  np.testing.assert_allclose(np.concatenate(jax.device_get(got), 1), full, atol=1e-5)
  _check_packed_equals_alone(cfg)
