"""The whole model computes one function whatever its implementations: for every family, the logits and the
parameter gradients under each fast path available on a CPU (the associative scan; the Pallas scan with the
Pallas conv, and the Pallas attention, in interpret mode) equal those of the reference (sequential scan, jnp
conv, blockwise jnp attention), in fp32. Not the full scan × attention product (23 compiled models, about twice
the time): each fast path once per family that has it, the Pallas kernels together as on a GPU."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from bmojo_jax import LanguageModel, Sublayer
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow              # ~90 CPU-seconds of compiles (14 models), one test per family

REFERENCE = ("sequential", "reference")   # (scan_impl, attn_impl)


def fast_paths(family: str) -> list[tuple[str, str]]:
  """(scan_impl, attn_impl) pairs covering every fast path the family has: the associative scan, then the
  Pallas scan and / or the Pallas attention."""
  cfg = tiny_config(family)
  scan, attention = Sublayer.MAMBA in cfg.sublayers, cfg.has_attention
  paths = [("associative", "reference")] if scan else []
  return paths + [("pallas" if scan else "sequential", "pallas" if attention else "reference")]


@pytest.fixture(scope="module")
def tokens():
  # 15 inputs: a partial last attention chunk (4) and scan chunk (8), a window (8) shorter than the row, and
  # the eidetic store full (capacity 4, 2 per chunk) before the last chunk.
  return jax.random.randint(jax.random.key(0), (2, 16), 0, 64)


def logits_and_grads(cfg, tokens):
  def loss_fn(model):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(), logits
  step = nnx.jit(lambda m: nnx.value_and_grad(loss_fn, has_aux=True)(m))
  with jax.default_matmul_precision("highest"):
    (_, logits), grads = step(LanguageModel(cfg, rngs=nnx.Rngs(0)))
  return np.asarray(logits), nnx.to_pure_dict(grads)


def test_every_implementation_gives_the_reference_logits_and_gradients(family, tokens):
  def run(scan_impl, attn_impl):
    conv_impl = "pallas" if scan_impl == "pallas" else "reference"   # the Mamba kernels together, as on a GPU
    cfg = tiny_config(family, init_std=0.1, compute=dict(scan_impl=scan_impl, attn_impl=attn_impl,
                                                         conv_impl=conv_impl))
    return logits_and_grads(cfg, tokens)

  ref_logits, ref_grads = run(*REFERENCE)
  ref_leaves = jax.tree.leaves_with_path(ref_grads)
  assert ref_leaves and np.all(np.isfinite(ref_logits))
  for impls in fast_paths(family):
    logits, grads = run(*impls)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5, err_msg=f"logits under {impls}")
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for (path, want), got in zip(ref_leaves, jax.tree.leaves(grads)):
      scale = float(np.max(np.abs(want)))
      assert scale > 0, f"zero gradient for {jax.tree_util.keystr(path)}"
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale,
                                 err_msg=f"gradient of {jax.tree_util.keystr(path)} under {impls}")
