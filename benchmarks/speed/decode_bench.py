"""Decode throughput and cache size per family (130M preset, bf16), written to decode_<device>.json.

    python3 -m benchmarks.speed.decode_bench [--size 130m] [--steps 64]

tokens/s = batch · steps / time of `steps` decode steps: `tokens_per_s` calls the compiled step once per token
from Python (cache donated), `scanned_tokens_per_s` runs them in one `Decoder.decode` (lax.scan on device).
A step's cost does not depend on what the cache holds, so the cache starts from `init_cache` with its position
set to the context; cache bytes come from shapes alone (`jax.eval_shape`).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import write_results
from benchmarks.speed.decoding import at_position, greedy
from bmojo_jax import ComputeConfig, Family, LanguageModel, preset
from bmojo_jax.inference import Decoder, cache_bytes

CONTEXTS = (1_024, 8_192, 65_536)


def scanned_tokens_per_s(decoder: Decoder, model: LanguageModel, batch: int, context: int, steps: int) -> float:
  """Throughput of `Decoder.decode`: the same step in a lax.scan on device, greedy sampling included."""
  logits = jnp.zeros((batch, model.cfg.vocab_size), jnp.float32)
  for _ in range(2):                                             # the first pass compiles
    cache = at_position(model.init_cache(batch, context + steps + 1), context)
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    tokens, _, _ = decoder.decode(logits, cache, steps)
    jax.block_until_ready(tokens)
  return batch * steps / (time.perf_counter() - t0)


def tokens_per_s(decoder: Decoder, model: LanguageModel, batch: int, context: int, steps: int) -> float:
  """Throughput of `Decoder.step` called once per token from Python (greedy argmax between steps)."""
  cache = at_position(model.init_cache(batch, context + steps + 1), context)
  logits, cache = decoder.step(jnp.zeros((batch,), jnp.int32), cache)
  for timed in (False, True):                                    # the first pass compiles and warms up
    jax.block_until_ready(logits)
    t0 = time.perf_counter()
    for _ in range(steps if timed else 2):
      logits, cache = decoder.step(greedy(logits), cache)
    jax.block_until_ready(logits)
  return batch * steps / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="130m")
  parser.add_argument("--steps", type=int, default=64)
  parser.add_argument("--batches", default="1,64")
  args = parser.parse_args()
  records = []
  for family in Family:
    cfg = preset(f"{family.value}-{args.size}", param_dtype="bfloat16", compute=ComputeConfig(dtype="bfloat16"))
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    decoder = Decoder(model)
    sizes = {c: cache_bytes(model, 1, c) for c in CONTEXTS}
    for batch in map(int, args.batches.split(",")):
      # Constant-cache families: one measurement holds for every context. The Transformer: per context,
      # as long as its KV cache fits in memory (64k x batch 64 does not on one GPU).
      contexts = CONTEXTS if family == Family.TRANSFORMER else (CONTEXTS[0],)
      for context in contexts:
        if cache_bytes(model, batch, context) > 40e9:
          continue
        tps = tokens_per_s(decoder, model, batch, context, args.steps)
        scanned = scanned_tokens_per_s(decoder, model, batch, context, args.steps)
        records.append(dict(op="decode", impl=family.value, family=family.value, preset=f"{family.value}-{args.size}",
                            dtype="bfloat16", shape=dict(batch=batch, context=context), batch=batch,
                            context=context, tokens_per_s=tps, ms_per_step=1e3 * batch / tps,
                            scanned_tokens_per_s=scanned,
                            cache_bytes={str(c): b * batch for c, b in sizes.items()}))
        print(f"{family.value:12s} batch {batch:3d} context {context:6d}: {tps:10.1f} tok/s step, "
              f"{scanned:10.1f} tok/s scanned  "
              f"cache 1k/8k/64k = {[round(sizes[c] * batch / 2**20, 1) for c in CONTEXTS]} MiB", flush=True)
    del model, decoder
  print(write_results(records, "decode"))


if __name__ == "__main__":
  main()
