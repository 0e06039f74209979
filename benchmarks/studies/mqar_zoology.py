"""MQAR under the Zoology protocol (docs/evals.md) through the real trainer; writes mqar_<device>.json.

    python3 -m benchmarks.studies.mqar_zoology --workdir /tmp/mqar [--family bmojo] [--lr 1e-3] [--epochs 8]

L=256, N=32, vocab 8192, window 32, d_model 128, batch 256, 100k train / 3k test examples, AdamW (wd 0.1),
cosine decay, no warmup, early stop once test accuracy > 0.99. One learning rate per call (Zoology sweeps four
and reports the best). Extra `--set key=value` items override config fields, e.g. model.eidetic_per_chunk=16.
"""

from __future__ import annotations

import argparse
import json
import os


from benchmarks.common import append_results, apply_overrides, device_tag
from bmojo_jax.configs import mqar
from bmojo_jax.train import trainer


def zoology_config(family: str, lr: float, epochs: int, overrides: list[str]):
  c = mqar.get_config(family)
  d = c.data
  d.seq_len, d.num_kv_pairs, d.vocab_size, d.num_train, d.num_test = 256, 32, 8192, 100_000, 3_000
  c.model.vocab_size, c.model.d_model = 8192, 128
  if family != "transformer":
    c.model.window, c.model.chunk_size = 32, 32
  c.model.compute.scan_impl = "auto"                 # Pallas on a GPU / TPU, the sequential scan on a CPU
  t = c.train
  t.batch_size, t.eval_batch_size = 256, 500
  t.target_accuracy = 0.99
  t.progress_bar = False
  c.optim.learning_rate, c.optim.warmup_steps, c.optim.weight_decay = lr, 0, 0.1
  apply_overrides(c, overrides)               # before the derived step counts below
  steps_per_epoch = d.num_train // t.batch_size
  t.num_steps = epochs * steps_per_epoch
  t.eval_every = max(1, steps_per_epoch // 2)
  t.checkpoint_every = t.num_steps
  return c


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--family", default="bmojo")
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--epochs", type=int, default=8)
  parser.add_argument("--set", action="append", default=[])
  parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  args = parser.parse_args()
  config = zoology_config(args.family, args.lr, args.epochs, args.set)
  result = trainer.train(config, args.workdir)
  record = dict(op="mqar", impl=args.family, protocol="zoology", learning_rate=args.lr, overrides=args.set,
                model={**{k: config.model[k] for k in ("d_model", "n_layers", "window", "chunk_size", "n_fading",
                                                       "n_eidetic", "eidetic_per_chunk", "store_policy")},
                       **{k: config.model.compute[k] for k in ("scan_impl", "attn_impl")}},
                **{k: result.get(k) for k in ("test_accuracy", "wall_s", "tokens_per_s", "step", "stopped_by",
                                              "data", "device", "jax_version")})
  with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
    record["curve"] = [json.loads(line) for line in f if '"eval"' in line]
  path = append_results([record], os.path.join(args.out, f"mqar_{device_tag()}.json"))
  print(f"{args.family} test accuracy {record['test_accuracy']} in {record['wall_s']:.0f} s "
        f"({record['tokens_per_s']:.0f} tokens/s, stopped by {record['stopped_by']}) -> {path}")


if __name__ == "__main__":
  main()
