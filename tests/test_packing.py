"""Packed documents (issue #14): a row that packs several documents computes what each document computes alone,
logits and parameter gradients, for every family and implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bmojo_jax import LanguageModel
from bmojo_jax.kernels import dot_product_attention
from bmojo_jax.segments import packing
from bmojo_jax.pallas_kernels.window_attention.reference import memory_attention_reference
from tests.conftest import FAMILY_TIERS, host_normal, host_tokens, tiny_config

# Lengths against chunk 4, window 8, conv width 4: documents shorter than the conv and than a chunk, documents
# starting mid-chunk and spanning several chunks, then trailing padding (segment id 0, as packing.py emits it).
DOCS = (11, 2, 1, 9, 6, 3)
PAD = 4
T = sum(DOCS) + PAD


def _row():
  ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(DOCS)] + [np.zeros(PAD, int)])
  bounds = np.cumsum((0,) + DOCS + (PAD,))
  return ids.astype(np.int32)[None], list(zip(bounds[:-1], bounds[1:]))


def test_packing_describes_runs():
  ids = jnp.asarray([[5, 5, 2, 2, 2, 5, 0, 0]])
  p = packing(ids, None, ids.shape)
  np.testing.assert_array_equal(p.ids, [[0, 0, 1, 1, 1, 2, 3, 3]])
  np.testing.assert_array_equal(p.offset, [[0, 1, 0, 1, 2, 0, 0, 1]])
  np.testing.assert_array_equal(p.end, [[2, 2, 5, 5, 5, 6, 8, 8]])
  np.testing.assert_array_equal(p.positions, p.offset)
  np.testing.assert_array_equal(p.starts, [[False, False, True, False, False, True, True, False]])
  assert packing(None, None, ids.shape) is None
  with pytest.raises(ValueError, match="segment_ids must be an integer array"):
    packing(ids[:, :4], None, ids.shape)


def _loss_grads(model, tokens, targets, segment_ids=None, weights=None):
  """Logits and the gradients of the summed cross entropy (at the positions where weights is 1)."""
  def loss_fn(m):
    logits = m(tokens, segment_ids)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (ce if weights is None else ce * weights).sum(), logits
  (_, logits), grads = nnx.jit(lambda m: nnx.value_and_grad(loss_fn, has_aux=True)(m))(model)
  return jax.device_get((logits, nnx.to_pure_dict(grads)))   # host copies: the checks run in numpy


def _check_packed_equals_alone(cfg, atol=1e-5):
  """Every document of the row run alone, all in one batch (one compile, not one per document length): row i
  holds document i from position 0, then zeros that a causal model cannot look back at, and the loss counts
  only the document's positions, so the batch's gradient is the sum of the documents' gradients. Inputs built
  and results checked in numpy (no eager XLA op per shape)."""
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  tokens, targets = (host_tokens(seed, (1, T), cfg.vocab_size) for seed in (3, 4))
  ids, bounds = _row()
  packed_logits, packed_grads = _loss_grads(model, tokens, targets, ids)
  width = max(hi - lo for lo, hi in bounds)
  inside = np.stack([np.arange(width) < hi - lo for lo, hi in bounds])
  take = np.stack([np.minimum(lo + np.arange(width), T - 1) for lo, _ in bounds])
  alone_tokens, alone_targets = (np.where(inside, x[0, take], 0).astype(np.int32) for x in (tokens, targets))
  logits, alone_grads = _loss_grads(model, alone_tokens, alone_targets, weights=inside.astype(np.float32))
  for row, (lo, hi) in enumerate(bounds):
    np.testing.assert_allclose(packed_logits[:, lo:hi], logits[row:row + 1, :hi - lo], atol=atol, rtol=atol,
                               err_msg=f"logits of the document at [{lo}, {hi})")
  for (path, g_packed), g_alone in zip(jax.tree_util.tree_leaves_with_path(packed_grads),
                                       jax.tree.leaves(alone_grads)):
    scale = max(1.0, float(np.max(np.abs(g_alone))))
    np.testing.assert_allclose(g_packed / scale, g_alone / scale, atol=atol, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("family", FAMILY_TIERS)   # two 2-block models compiled a family
def test_packed_row_equals_documents_alone(family):
  """The references: sequential scan, blockwise jnp attention; fifo store, 2 blocks."""
  _check_packed_equals_alone(tiny_config(family, n_layers=4, init_std=0.1, compute=dict(scan_impl="sequential")))


@pytest.mark.parametrize("family,scan_impl,attn_impl,policy", [
    pytest.param("bmojo", "associative", "reference", "score", marks=pytest.mark.slow),
    ("bmojo", "pallas", "pallas", "fifo"),                             # the inner loop: both kernels at once
    pytest.param("transformer", "sequential", "pallas", "fifo", marks=pytest.mark.slow),
])
def test_packed_row_equals_documents_alone_per_impl(family, scan_impl, attn_impl, policy):
  """The fast paths (kernels in interpret mode): B'MOJO holds every part the other families have."""
  cfg = tiny_config(family, init_std=0.1, store_policy=policy,
                    compute=dict(scan_impl=scan_impl, attn_impl=attn_impl,
                                 conv_impl="pallas" if scan_impl == "pallas" else "reference"))
  _check_packed_equals_alone(cfg)


@pytest.mark.parametrize("window", [None, 8])
def test_cudnn_path_masks_segments(window):
  """attn_impl='cudnn' goes through jax.nn.dot_product_attention with a segment mask; on CPU through XLA."""
  q = host_normal(0, (1, T, 4, 16))
  k, v = (host_normal(seed, (1, T, 2, 16)) for seed in (1, 2))
  ids = packing(_row()[0], None, (1, T)).ids
  # both sides compiled (op by op, the reference's blockwise loop cost seconds)
  got = jax.jit(lambda q, k, v, ids: dot_product_attention(q, k, v, window=window, chunk=4, segment_ids=ids,
                                                           implementation="xla"))(q, k, v, ids)
  want = jax.jit(lambda q, k, v, ids: memory_attention_reference(q, k, v, window=window, chunk=4,
                                                                 segment_ids=ids))(q, k, v, ids)
  np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match="no memory tokens"):
    dot_product_attention(q, k, v, window=window, chunk=4, mem_span=jnp.zeros((1, 10, 2, 4), jnp.int32),
                          implementation="xla")


@pytest.mark.slow   # the trainer's loss on packing.py's packed rows, then every document alone (two compiles)
def test_trainer_loss_keeps_packed_text_documents_apart():
  """train/data/packing.py's packed rows through the trainer's loss: the sum of each document's loss alone.
  Both sides jitted (op by op this took minutes); the documents alone in one batch, as `_check_packed_equals_alone`
  runs them (one compile, not one per length): row i holds document i from position 0, then zeros that a
  causal model cannot look back at and that the loss does not count."""
  from bmojo_jax.train import steps
  from bmojo_jax.train.data.packing import IGNORE_INDEX, pack_documents
  from bmojo_jax.train.data.tokenizers import ByteTokenizer
  source = pack_documents(["a tiny one", "xy", "", "and a longer document of text"], ByteTokenizer(), seq_len=40)
  batch = {k: jnp.asarray(v)[None] for k, v in source[0].items()}
  cfg = tiny_config("bmojo", vocab_size=259, init_std=0.1, compute=dict(scan_impl="sequential"))
  graphdef, params = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)))
  loss, (n, _, _) = jax.jit(steps.loss_sums, static_argnums=0)(graphdef, params, batch)

  @jax.jit
  def document_losses(params, inputs, targets):   # a document a row: (ce sum [N], supervised tokens [N])
    valid = targets != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, params)(inputs),
                                                         jnp.where(valid, targets, 0))
    return jnp.sum(jnp.where(valid, ce, 0), -1), valid.sum(-1)

  ids = np.asarray(batch["segment_ids"][0])
  bounds = [(where[0], where[-1] + 1) for where in (np.flatnonzero(ids == seg) for seg in np.unique(ids[ids > 0]))]
  width = max(hi - lo for lo, hi in bounds)
  alone = {k: np.full((len(bounds), width), fill, np.int32) for k, fill in (("inputs", 0), ("targets", IGNORE_INDEX))}
  for row, (lo, hi) in enumerate(bounds):
    for k in alone:
      alone[k][row, :hi - lo] = np.asarray(batch[k][0, lo:hi])
  ce, valid = document_losses(params, jnp.asarray(alone["inputs"]), jnp.asarray(alone["targets"]))
  want, count = float(jnp.sum(ce)), int(jnp.sum(valid))
  assert int(n.sum()) == count and len(bounds) >= 3
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
