"""Selection scores: how much each token deserves a place in the eidetic store (docs/spec.md).

Innovation (the default): on the attention input a_t [B, T, D],
    â_t = (1/4) Σ_{j=1..4} a_{t-j}       (a_{<0} = 0),      e_t = ‖a_t − â_t‖²   (fp32, no gradient).
`cfg.selection` swaps the innovation for another score (`SELECTION_SCORES`, docs/mqar.md "Selection
variants"); the selection of each chunk's top k_e (`bmojo_jax.memory.selection`) and the store are the same for
every score.

Linear (`linear_scores`): the paper's "more faithful" choice, a learnable linear predictor over the same four
inputs, â_t = Σ_{j=1..4} a_{t-j} W_j (W [4, D, D], initialized to I/4: it starts as the innovation test), and
e_t = ‖a_t − â_t‖². Its training signal is an auxiliary loss, λ Σ_t ‖sg(a_t) − Σ_j sg(a_{t-j}) W_j‖² / D over
the row's tokens (λ = cfg.predictor_loss_weight), whose gradient reaches W only (`train_predictor`): the model
is not trained to be predictable. The loss is not added to the reported loss; its gradient joins the
cross-entropy's, and both are divided by the same supervised-token count in the trainer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bmojo_jax.config import Selection

PREDICTOR_TAPS = 4


class ScoreInputs(NamedTuple):
  """What a selection score may read for T consecutive tokens of one attention sublayer.

  a [B, T, D] attention input; k, v [B, T, K, P] its keys (without RoPE) and values; fk, fv [B, T, K, P] the
  key/value projections of the fading source (the normed Mamba output at t, a read-out of the SSM state);
  history [B, 4, D] fp32, a_{-4..-1}; prev_fk, prev_fv [B, 1, K, P] the fading projections at t = -1, or None
  (zeros: the sequence starts here); reach [B, T] int or None, how many tokens before t a score may read (a
  packed row: the position within the document); w_s [D] the learned scorer's weights, or None; w_p [4, D, D]
  the linear predictor's weights and predictor_loss_weight λ its auxiliary loss's weight (`linear_scores`).
  """
  a: jax.Array
  k: jax.Array
  v: jax.Array
  fk: jax.Array | None = None
  fv: jax.Array | None = None
  history: jax.Array | None = None
  prev_fk: jax.Array | None = None
  prev_fv: jax.Array | None = None
  reach: jax.Array | None = None
  w_s: jax.Array | None = None
  w_p: jax.Array | None = None
  predictor_loss_weight: float = 0.0


def innovation_scores(a: jax.Array, history: jax.Array | None = None, reach: jax.Array | None = None
                      ) -> jax.Array:
  """e [B, T] fp32, no gradient.

  a [B, T, D]; history [B, 4, D] holds a_{-4..-1} (zeros at the sequence start; the history after a is
  `last_inputs`); reach [B, T] int or None: how many inputs before t the predictor may read (a packed row: the
  position within the document, so the history restarts at a document's first token); None: all of them.
  """
  a = jax.lax.stop_gradient(a).astype(jnp.float32)
  taps = predictor_taps(a, history, reach)                                       # [B, T, 4, D]
  pred = sum(taps[:, :, j - 1] for j in range(1, PREDICTOR_TAPS + 1))
  err = a - pred / PREDICTOR_TAPS
  return jnp.sum(err * err, axis=-1)


def predictor_taps(a: jax.Array, history: jax.Array | None = None, reach: jax.Array | None = None) -> jax.Array:
  """[B, T, 4, D] fp32 without gradient: tap j-1 of token t is a_{t-j}, j = 1..4 (history [B, 4, D] before
  the sequence, zeros without; zeros where reach [B, T] < j: a packed row's earlier document)."""
  t = a.shape[1]
  if t == 1 and history is not None and reach is None:   # a decode step: the taps are the history, newest first
    return jax.lax.stop_gradient(history).astype(jnp.float32)[:, ::-1][:, None]   # (no [B, 5, D] concatenate)
  full = _with_history(a, history)                                               # [B, 4+T, D]

  def tap(j):                                                                    # a_{t-j}
    x = full[:, PREDICTOR_TAPS - j:PREDICTOR_TAPS - j + t]
    return x if reach is None else jnp.where((reach >= j)[..., None], x, 0)

  return jnp.stack([tap(j) for j in range(1, PREDICTOR_TAPS + 1)], axis=2)


def linear_errors(a: jax.Array, taps: jax.Array, w_p: jax.Array) -> jax.Array:
  """‖a_t − Σ_j taps[t, j] W_j‖² [B, T] fp32: a [B, T, D] and taps [B, T, 4, D] (`predictor_taps`) without
  gradient, the gradient to w_p [4, D, D] only."""
  pred = jnp.einsum("BTJD,JDE->BTE", taps, w_p.astype(jnp.float32))
  err = jax.lax.stop_gradient(a).astype(jnp.float32) - pred
  return jnp.sum(err * err, axis=-1)


def linear_scores(a: jax.Array, w_p: jax.Array, history: jax.Array | None = None,
                  reach: jax.Array | None = None) -> jax.Array:
  """e_t = ‖a_t − Σ_{j=1..4} a_{t-j} W_j‖² [B, T] fp32, no gradient. a [B, T, D]; w_p [4, D, D]; history,
  reach as `innovation_scores`'."""
  return jax.lax.stop_gradient(linear_errors(a, predictor_taps(a, history, reach), w_p))


def predictor_loss(a: jax.Array, taps: jax.Array, w_p: jax.Array) -> jax.Array:
  """The linear predictor's auxiliary loss before its weight: Σ_{b,t} ‖a_t − â_t‖² / D, a scalar (gradient to
  w_p only)."""
  return jnp.sum(linear_errors(a, taps, w_p)) / a.shape[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def train_predictor(v: jax.Array, w_p: jax.Array, a: jax.Array, taps: jax.Array, weight: float) -> jax.Array:
  """v unchanged; in the backward pass w_p [4, D, D] gets the gradient of weight · `predictor_loss`(a, taps,
  w_p), whatever reaches v (which passes its own cotangent on). The values v [B, T, K, P] carry the
  predictor's training signal into any loss the memory takes part in, without a second output to thread
  through the layers (as the learned score rides on them, `straight_through_values`); a, taps get none."""
  del w_p, a, taps, weight
  return v


def _train_predictor_fwd(v, w_p, a, taps, weight):
  return v, (w_p, jax.lax.stop_gradient(a), taps)


def _train_predictor_bwd(weight, residuals, g):
  w_p, a, taps = residuals
  g_w = jax.grad(lambda w: weight * predictor_loss(a, taps, w))(w_p)
  return g, g_w.astype(w_p.dtype), jnp.zeros_like(a), jnp.zeros_like(taps)


train_predictor.defvjp(_train_predictor_fwd, _train_predictor_bwd)


def input_norm_scores(a: jax.Array) -> jax.Array:
  """e_t = ‖a_t‖² [B, T] fp32, no gradient. a [B, T, D]."""
  a = jax.lax.stop_gradient(a).astype(jnp.float32)
  return jnp.sum(a * a, axis=-1)


def ssm_error_scores(k: jax.Array, v: jax.Array, fk: jax.Array, fv: jax.Array, prev_fk: jax.Array | None = None,
                     prev_fv: jax.Array | None = None, reach: jax.Array | None = None) -> jax.Array:
  """The SSM's prediction error in the memory's own space, [B, T] fp32 without gradient:
      e_t = ‖k_t − k^f_{t-1}‖² + ‖v_t − v^f_{t-1}‖².

  (k^f, v^f)_{t-1} = (W_k, W_v) s̄_{t-1} is the fading token the SSM state would give at t-1 (s̄ the normed
  Mamba output of the same block, which reads out the state after tokens ≤ t-1): the memory entry that stands
  for the whole past before t. e_t is large when token t's key/value is far from it, i.e. when the fading
  memory would not carry the token, which is what the eidetic store is for. k, v, fk, fv [B, T, K, P];
  prev_fk, prev_fv [B, 1, K, P] the fading projections at t = -1 (None: zeros); reach [B, T] (a packed row: 0
  at a document's first token, whose previous read-out belongs to another document and counts as zero) or None.
  """
  def err(x, f, prev):
    x, f = (jax.lax.stop_gradient(y).astype(jnp.float32) for y in (x, f))
    prev = jnp.zeros_like(f[:, :1]) if prev is None else jax.lax.stop_gradient(prev).astype(jnp.float32)
    before = jnp.concatenate([prev, f[:, :-1]], axis=1)                          # f_{t-1} [B, T, K, P]
    if reach is not None:
      before = jnp.where((reach >= 1)[..., None, None], before, 0)
    return jnp.sum(jnp.square(x - before), axis=(-2, -1))
  return err(k, fk, prev_fk) + err(v, fv, prev_fv)


def learned_scores(a: jax.Array, w_s: jax.Array) -> jax.Array:
  """s_t = a_t · w_s [B, T] fp32, with gradient (to a and w_s). a [B, T, D]; w_s [D]."""
  return jnp.einsum("BTD,D->BT", a.astype(jnp.float32), w_s.astype(jnp.float32))


def straight_through_values(v: jax.Array, score: jax.Array) -> jax.Array:
  """v + v · (σ(s) − sg(σ(s))): v [B, T, K, P] unchanged in the forward pass (the added term is exactly 0), while
  the gradient reaching a selected value v_t also reaches its score s_t [B, T] as ∂L/∂s_t = σ'(s_t) ⟨∂L/∂v_t,
  v_t⟩: "would this memory token's contribution, scaled up, have lowered the loss". Unselected tokens are
  never read, so their scores get no gradient from the loss; the linear scorer generalizes across tokens."""
  gate = jax.nn.sigmoid(score)
  zero = (gate - jax.lax.stop_gradient(gate)).astype(v.dtype)                   # exactly 0, gradient σ'(s)
  return v + v * zero[..., None, None]


# Selection -> fn(ScoreInputs) -> scores [B, T] fp32 (largest first; only `learned`'s carry a gradient).
SELECTION_SCORES = {
    Selection.INNOVATION: lambda x: innovation_scores(x.a, x.history, x.reach),
    Selection.LEARNED: lambda x: learned_scores(x.a, x.w_s),
    Selection.SSM_ERROR: lambda x: ssm_error_scores(x.k, x.v, x.fk, x.fv, x.prev_fk, x.prev_fv, x.reach),
    Selection.INPUT_NORM: lambda x: input_norm_scores(x.a),
    Selection.LINEAR: lambda x: linear_scores(x.a, x.w_p, x.history, x.reach),
}


def selection_scores(selection: Selection, x: ScoreInputs) -> tuple[jax.Array, jax.Array]:
  """(scores [B, T] fp32 without gradient, values [B, T, K, P] to store) of the tokens in x: the values are
  x.v, passed through `straight_through_values` for the learned score so that its scorer trains, and through
  `train_predictor` for the linear one (its auxiliary loss, weight x.predictor_loss_weight)."""
  selection = Selection(selection)
  scores = SELECTION_SCORES[selection](x)
  v = x.v
  if selection == Selection.LEARNED:
    v = straight_through_values(x.v, scores)
  elif selection == Selection.LINEAR and x.predictor_loss_weight:
    a = jax.lax.stop_gradient(x.a).astype(jnp.float32)
    v = train_predictor(x.v, x.w_p, a, predictor_taps(a, x.history, x.reach), float(x.predictor_loss_weight))
  return jax.lax.stop_gradient(scores), v


def _with_history(a: jax.Array, history: jax.Array | None) -> jax.Array:
  """[B, 4+T, D] fp32 without gradient: a_{-4..-1} (history [B, 4, D]; None: zeros), then a [B, T, D]."""
  a = jax.lax.stop_gradient(a).astype(jnp.float32)
  if history is None:
    history = jnp.zeros((a.shape[0], PREDICTOR_TAPS, a.shape[2]), jnp.float32)
  return jnp.concatenate([history, a], axis=1)


def last_inputs(a: jax.Array, history: jax.Array | None = None) -> jax.Array:
  """The innovation predictor's history after a [B, T, D]: a_{T-4..T-1} [B, 4, D] fp32 (earlier from
  `history`, zeros at the sequence start)."""
  return _with_history(a, history)[:, -PREDICTOR_TAPS:]
