"""A whole B'MOJO model with the Pallas scan and the Pallas attention vs the reference paths (GPU check).

    python3 -m benchmarks.checks.model_impls_check            # writes model_impls_<device>.json

Same parameters, same tokens; compares logits and every parameter gradient (fp32 and bf16) for
(associative, reference) and (pallas, pallas) against (sequential, reference).
"""

from __future__ import annotations

import argparse

import jax
import optax
from flax import nnx

from benchmarks.common import rel_err, write_results
from bmojo_jax import ComputeConfig, LanguageModel, ModelConfig
from bmojo_jax.pallas_kernels.window_attention import BlockSizes
from bmojo_jax.pallas_kernels.window_attention.ops import resolve_impls


def loss_and_grads(cfg: ModelConfig, tokens):
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))   # impl fields do not change the initialization

  @nnx.jit
  def run(model, tokens):
    def loss_fn(model):
      logits = model(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(), logits
    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return logits, grads
  logits, grads = run(model, tokens)
  return logits, jax.tree.leaves(nnx.state(grads))


def main(smoke: bool = False):
  """smoke: a tiny model and sequence, to check the script on CPU (interpret mode)."""
  records = []
  size = dict(d_model=32, window=8, chunk_size=4, n_fading=2, n_eidetic=4, eidetic_per_chunk=2) if smoke else \
      dict(d_model=256, window=256, chunk_size=128, n_fading=8, n_eidetic=32, eidetic_per_chunk=8)
  t = 21 if smoke else 1001
  for dtype in ("float32", "bfloat16"):
    base = ModelConfig(family="bmojo", vocab_size=512, n_layers=4, n_heads=4, n_kv_heads=2, **size,
                       compute=ComputeConfig(dtype=dtype, scan_impl="sequential", attn_impl="reference"))
    tokens = jax.random.randint(jax.random.key(0), (2, t), 0, base.vocab_size)
    # fp32 is compared at full matmul precision: XLA's default on GPUs is TF32 for fp32 dots.
    precision = "highest" if dtype == "float32" else "default"
    with jax.default_matmul_precision(precision):
      ref_logits, ref_grads = loss_and_grads(base, tokens)
    for scan_impl, attn_impl in (("associative", "reference"), ("pallas", "pallas")):
      with jax.default_matmul_precision(precision):
        logits, grads = loss_and_grads(base.with_compute(scan_impl=scan_impl, attn_impl=attn_impl), tokens)
      # chunk 128 and head_dim 64 let bf16 take the Mosaic kernels on Hopper ("auto"); fp32 takes Triton
      chosen = resolve_impls(BlockSizes.get_default(64, True), dtype, 64, size["chunk_size"],
                             size["n_fading"] + size["n_eidetic"], smoke)
      kernels = "jnp" if attn_impl != "pallas" else \
          f"{chosen.forward_impl} fwd, {chosen.dq_impl} dq, {chosen.dkdv_impl} dk/dv"
      rec = dict(op="bmojo_model", scan_impl=scan_impl, attn_impl=attn_impl, dtype=dtype,
                 attention_forward=chosen.forward_impl if attn_impl == "pallas" else None,
                 attention_dq=chosen.dq_impl if attn_impl == "pallas" else None,
                 attention_dkdv=chosen.dkdv_impl if attn_impl == "pallas" else None,
                 shape=dict(B=2, T=t - 1, **size),
                 logits_rel_err=rel_err(logits, ref_logits),
                 worst_grad_rel_err=max(rel_err(g, r) for g, r in zip(grads, ref_grads)))
      tol = 1e-4 if dtype == "float32" else 2e-2
      rec["pass"] = rec["logits_rel_err"] <= tol and rec["worst_grad_rel_err"] <= tol
      records.append(rec)
      print(f"{dtype:9s} scan={scan_impl:11s} attn={attn_impl:9s} ({kernels}) "
            f"logits {rec['logits_rel_err']:.2e} worst grad {rec['worst_grad_rel_err']:.2e} "
            f"{'ok' if rec['pass'] else 'FAIL'}", flush=True)
  if not smoke:
    print(write_results(records, "model_impls"))
  return records


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (interpret mode); writes nothing")
  main(smoke=ap.parse_args().smoke)
