"""Forward+backward time of every family's MQAR-sized preset (d_model 128, vocab 8192, 2 blocks) and the
parameter count of every preset; writes mqar_models_<device>.json.

    python -m benchmarks.speed.mqar_models_cpu [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse

import jax
import optax
from flax import nnx

from benchmarks.common import median_ms, write_results
from bmojo_jax import Family, LanguageModel, PRESET_NAMES, count_params, mqar_config, preset


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  args = parser.parse_args()
  records = [dict(op="param_count", impl=name, params=count_params(preset(name))) for name in PRESET_NAMES]
  for family in Family:
    cfg = mqar_config(family)
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, cfg.vocab_size)

    @jax.jit
    def fwd_bwd(state, tokens):
      def loss_fn(state):
        logits = nnx.merge(graphdef, state)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
      return jax.value_and_grad(loss_fn)(state)

    fwd = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens[:, :-1]))
    rec = dict(op="mqar_model", impl=family.value, preset=f"{family.value}-mqar", dtype="float32",
               shape=dict(B=args.batch, T=args.seq), params=count_params(cfg),
               scan_impl=cfg.compute.scan_impl.value,
               fwd_ms=median_ms(fwd, state, tokens, warmup=1, iters=5),
               fwdbwd_ms=median_ms(fwd_bwd, state, tokens, warmup=1, iters=5))
    records.append(rec)
    print(f"{family.value:12s} {rec['params']:>10,d} params  fwd {rec['fwd_ms']:8.1f} ms  "
          f"fwd+bwd {rec['fwdbwd_ms']:8.1f} ms", flush=True)
  print(write_results(records, "mqar_models"))


if __name__ == "__main__":
  main()
