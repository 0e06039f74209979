"""The language-model loss from the last hidden states: cross-entropy and accuracy per token.

Two implementations of one thing (`LossImpl`):

  reference   logits = x·wᵀ [B, T, V] fp32 (`LanguageModel.logits`), then `token_losses_reference`; autodiff
              keeps the fp32 logits for the backward and reads them again (3.3 GB at 1.4B, T·B = 16k tokens,
              V = 50280).
  chunked     `linear_cross_entropy`: the same sums over blocks of tokens; a block's logits [B, tb, V] live
              only inside one iteration of a `lax.scan`. Under differentiation the forward also computes the
              block's gradients (dx for its tokens, dw summed in fp32 over blocks), so the backward is a scale
              by the loss's cotangent: no [B, T, V] array in either pass and no recomputed GEMM (the three
              GEMMs of the reference: logits, dx, dw).

Both count a token correct when its label's logit is STRICTLY the largest (a tie is wrong: all-equal logits
of an untrained model score 0). `max over the other classes` is one masked max, so the accuracy costs no
pass of its own: top = max(label logit, max over the others).

Shapes: x [B, T, D] (final-normed hidden states, compute dtype), w [V, D] (the head, tied or not, in x's
dtype), labels [B, T] int in [0, V), weights [B, T] fp32 (1 = scored, 0 = ignored).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _ce_and_correct(logits, labels):
  """logits [..., V] fp32, labels [...] -> (ce [...] fp32, correct [...] bool, lse [...] fp32)."""
  vocab = jnp.arange(logits.shape[-1], dtype=labels.dtype)
  is_label = vocab == labels[..., None]                                                  # [..., V]
  label_logit = jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)                       # [...]
  others = jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)                      # max over v != label
  top = jax.lax.stop_gradient(jnp.maximum(others, label_logit))
  lse = jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1)) + top
  return lse - label_logit, label_logit > others, lse


def token_losses_reference(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(ce [B, T] fp32, correct [B, T] bool) of logits [B, T, V] fp32 against labels [B, T] (strict rule)."""
  ce, correct, _ = _ce_and_correct(logits, labels)
  return ce, correct


def _blocks(a, tb):
  """[B, nb·tb, ...] -> [nb, B, tb, ...]: the scan runs over token blocks along T, so rows (the batch axes of
  a mesh) stay where they are."""
  return jnp.swapaxes(a.reshape(a.shape[0], a.shape[1] // tb, tb, *a.shape[2:]), 0, 1)


def _unblock(a):
  """[nb, B, tb, ...] -> [B, nb·tb, ...]."""
  a = jnp.swapaxes(a, 0, 1)
  return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])


def _block_logits(xb, w):
  return jnp.einsum("BTD,VD->BTV", xb, w, preferred_element_type=jnp.float32)           # [B, tb, V] fp32


def _forward(x, w, labels, weights, tb):
  """(loss sum, ce [B, T], correct [B, T]) without gradients."""
  def body(_, blk):
    xb, lb, wb = blk
    ce, correct, _ = _ce_and_correct(_block_logits(xb, w), lb)
    return None, (ce, correct, jnp.sum(wb * ce))
  _, (ce, correct, sums) = jax.lax.scan(body, None, tuple(_blocks(a, tb) for a in (x, labels, weights)))
  return jnp.sum(sums), _unblock(ce), _unblock(correct)


def _forward_with_grads(x, w, labels, weights, tb):
  """As `_forward`, plus dx [B, T, D] (x.dtype) and dw [V, D] (w.dtype) of the loss sum.

  Per block: p = softmax(logits); dlogits = weight·(p − onehot(label)), rounded to x's dtype as
  `layers.logits_einsum`'s backward rounds the reference's cotangent; dx = dlogits·w and dw += dlogitsᵀ·x,
  both with fp32 accumulation (dw's sum over blocks in fp32, rounded once)."""
  vocab = jnp.arange(w.shape[0], dtype=labels.dtype)

  def body(dw, blk):
    xb, lb, wb = blk
    logits = _block_logits(xb, w)
    ce, correct, lse = _ce_and_correct(logits, lb)
    p = jnp.exp(logits - lse[..., None])
    dlogits = (wb[..., None] * (p - (vocab == lb[..., None]))).astype(x.dtype)        # [B, tb, V]
    dxb = jnp.einsum("BTV,VD->BTD", dlogits, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = dw + jnp.einsum("BTV,BTD->VD", dlogits, xb, preferred_element_type=jnp.float32)
    return dw, (ce, correct, jnp.sum(wb * ce), dxb)

  dw0 = jnp.zeros(w.shape, jnp.float32)
  dw, (ce, correct, sums, dx) = jax.lax.scan(body, dw0, tuple(_blocks(a, tb) for a in (x, labels, weights)))
  return jnp.sum(sums), _unblock(ce), _unblock(correct), _unblock(dx), dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _linear_ce(x, w, labels, weights, tb):
  return _forward(x, w, labels, weights, tb)


def _linear_ce_fwd(x, w, labels, weights, tb):
  loss, ce, correct, dx, dw = _forward_with_grads(x, w, labels, weights, tb)
  return (loss, ce, correct), (dx, dw, ce)


def _linear_ce_bwd(tb, res, cts):
  # Only the loss sum carries a gradient: `linear_cross_entropy` stops the gradient of ce (and correct is
  # boolean), so their cotangents are zero.
  del tb
  dx, dw, ce = res
  g = cts[0]
  return ((g * dx.astype(jnp.float32)).astype(dx.dtype), (g * dw.astype(jnp.float32)).astype(dw.dtype), None,
          g * ce)


_linear_ce.defvjp(_linear_ce_fwd, _linear_ce_bwd)


def linear_cross_entropy(x: jax.Array, w: jax.Array, labels: jax.Array, weights: jax.Array,
                         block: int = 4096) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The head and its loss in blocks of about `block` tokens, never holding logits [B, T, V].

  x [B, T, D] (final-normed hidden states); w [V, D] in x's dtype; labels [B, T] int in [0, V) (ignored
  positions: any valid id, weight 0); weights [B, T] fp32. Returns (Σ weights·ce fp32 — differentiable in x, w
  and weights —, ce [B, T] fp32 with its gradient stopped, correct [B, T] bool by the strict rule).

  A block is all B rows × tb = max(1, block // B) positions (the scan runs along T; T is padded to a multiple
  of tb with weight-0 tokens). Its transient memory is about B·tb·V·10 bytes (fp32 logits and p, the
  cotangent in x's dtype): 2 GB at block 4096, V 50280. Each block adds its dw into the fp32 [V, D] sum (on
  a GPU XLA can fold the add into the GEMM as its addend; unmeasured); fewer, larger blocks make fewer such
  passes.
  """
  batch, t, _ = x.shape
  tb = max(1, min(t, block // batch))
  pad = -t % tb
  if pad:
    x, labels, weights = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (x, labels, weights))
  loss, ce, correct = _linear_ce(x, w, labels, weights.astype(jnp.float32), tb)
  return loss, jax.lax.stop_gradient(ce[:, :t]), correct[:, :t]
