"""The dots_attention remat policy: keeps the attention kernels' outputs, reruns only the selective scan's
forward in the backward (not its fp32 state checkpoints hc, which its forward pass does not write), and changes
no gradient (dots_kernels' own equality to no remat is tests/test_model.py's). Under both policies the conv +
SiLU kernel's output ([B, T, E], a custom VJP's, which neither policy names) is recomputed, not kept: 3.2 GB less
over the 24 Mamba sublayers at 1.4B, 16k tokens, for one cheap kernel rerun."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from bmojo_jax import LanguageModel
from bmojo_jax.config import RematPolicy
from bmojo_jax.model import RECOMPUTE_DOTS_UP_TO, REMAT_POLICIES
from bmojo_jax.pallas_kernels.window_attention.blocks import BlockSizes
from bmojo_jax.pallas_kernels.window_attention.ops import memory_attention_gpu
from tests.conftest import jaxpr_eqns, tiny_config


def _pallas_calls(jaxpr, prefix: str, n_out: int | None = None) -> int:
  """pallas_call equations whose kernel name starts with prefix (and with n_out outputs, if given), in jaxpr
  and every jaxpr inside it."""
  return sum(eqn.primitive.name == "pallas_call" and str(eqn.params["name"]).startswith(prefix)
             and n_out in (None, len(eqn.outvars)) for eqn, _ in jaxpr_eqns(jaxpr))


def test_dots_attention_recomputes_only_the_scan():
  tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, 64)
  out = {}
  for remat in ("dots_kernels", "dots_attention"):
    # One block: the policy is applied per block, and each compile of the interpret-mode kernels is half of two
    # blocks'.
    cfg = tiny_config("bmojo", compute=dict(scan_impl="pallas", attn_impl="pallas", conv_impl="pallas",
                                            remat=remat))
    graphdef, params = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)))
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, p)(tokens[:, :-1]), tokens[:, 1:]).mean()
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    saved = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, _ in saved_residuals(loss, params))
    out[remat] = (jax.jit(jax.value_and_grad(loss))(params), saved,
                  {k: _pallas_calls(jaxpr, k) for k in ("selective_scan_fwd", "selective_scan_bwd",
                                                        "memory_attention", "causal_conv_silu_fwd",
                                                        "causal_conv_silu_bwd")},
                  _pallas_calls(jaxpr, "selective_scan_fwd", n_out=3))   # y, h_last and hc
  blocks = 1
  calls_k, calls_a = out["dots_kernels"][2], out["dots_attention"][2]
  # The scan forward that writes hc runs once a block under either: dots_kernels in the forward pass (hc kept),
  # dots_attention in the backward, its forward pass running the kernel without hc.
  assert out["dots_kernels"][3] == out["dots_attention"][3] == blocks
  assert calls_k == {"selective_scan_fwd": blocks, "selective_scan_bwd": blocks,
                     "memory_attention": calls_k["memory_attention"],
                     "causal_conv_silu_fwd": 2 * blocks, "causal_conv_silu_bwd": blocks}   # the conv: rerun
  assert calls_a == {**calls_k, "selective_scan_fwd": 2 * blocks}     # the scan forward again, nothing else
  # Not kept any more, per block, at least the state checkpoints hc [B, T/4, E, N] fp32 (B 2, T 16, E 64, N 4).
  assert out["dots_kernels"][1] - out["dots_attention"][1] >= blocks * 2 * 4 * 64 * 4 * 4
  (loss_k, grads_k), (loss_a, grads_a) = out["dots_kernels"][0], out["dots_attention"][0]
  np.testing.assert_allclose(loss_a, loss_k, rtol=1e-6)
  chex.assert_trees_all_close(grads_a, grads_k, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("remat", ["dots_kernels", "dots_attention", "full"])
def test_mosaic_attention_forward_is_kept(remat):
  """The memory attention's Mosaic forward (Hopper; `plgpu.kernel` makes it a custom_vmap_call, not a
  pallas_call) runs once a step under both policies that keep the attention kernels' outputs: they are saved by
  name (`ops.KERNEL_OUTPUTS`). Under "full" it reruns in the backward. Lowered for a GPU on any host, dq and
  dk/dv on Triton, so every Mosaic custom call is a forward."""
  b, t, h, p, chunk, m = 1, 256, 2, 64, 128, 16
  q = jnp.ones((b, t, h, p), jnp.bfloat16)
  mem = jnp.ones((b, t // chunk, m, h, p), jnp.bfloat16)
  mem_valid = jnp.ones((b, t // chunk, m), jnp.int32)
  blocks = dataclasses.replace(BlockSizes.get_default(p, has_memory=True), forward_impl="mosaic",
                               dq_impl="triton", dkdv_impl="triton")

  def loss(q, k, v, mem_k, mem_v):
    o = memory_attention_gpu(q, k, v, mem_k, mem_v, mem_valid, None, None, window=chunk, chunk=chunk, scale=0.125,
                             block_sizes=blocks, interpret=False)
    return jnp.sum(jnp.square(o.astype(jnp.float32)))
  step = jax.value_and_grad(jax.checkpoint(loss, policy=REMAT_POLICIES[RematPolicy(remat)]), argnums=range(5))
  text = jax.jit(step).trace(q, q, q, mem, mem).lower(lowering_platforms=("cuda",)).as_text()
  forwards = sum("custom_call" in line and "mosaic_gpu" in line for line in text.splitlines())
  assert forwards == (2 if remat == "full" else 1)


@pytest.mark.parametrize("remat", ["dots_kernels", "dots_attention"])
def test_thin_matmuls_are_recomputed(remat):
  """Matmuls contracting over <= RECOMPUTE_DOTS_UP_TO elements are rerun, not kept: at d_model 512 that is
  Mamba's dt_proj alone (K = dt_rank 32), whose [B, T, E] output is as large as each half of in_proj's. Traced
  abstractly, nothing computed."""
  cfg = tiny_config("mamba", compute=dict(remat=remat, dtype="bfloat16", scan_layers=False), d_model=512)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  loss = lambda p, t: nnx.merge(graphdef, p)(t).sum()
  kept = [aval.shape for aval, why in saved_residuals(loss, params, tokens) if "dot_general" in why]
  assert cfg.rank <= RECOMPUTE_DOTS_UP_TO < cfg.d_model
  # per Mamba sublayer (two): in_proj's u and z, not dt_proj's delta; x_proj's (K = d_inner) stays
  assert kept.count((2, 16, cfg.d_inner)) == 2 * cfg.n_layers, kept
  assert kept.count((2, 16, cfg.rank + 2 * cfg.d_state)) == cfg.n_layers, kept
