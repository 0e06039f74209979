"""One population of the sweep: the trainer config of a (family, variant, d_model, N), its key fields, and its
training by `train.population` into one record per run."""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from benchmarks.common import device_name
from benchmarks.studies.mqar_sweep.records import population_folder
from benchmarks.studies.mqar_zoology import zoology_config
from bmojo_jax import Sublayer, count_params
from bmojo_jax.kernels import resolve_attn_impl, resolve_scan_impl
from bmojo_jax.train import population as pop_lib
from bmojo_jax.train import population_loop
from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train.data import mqar

FAMILIES = ("transformer", "mamba", "hybrid", "bmojo_f", "bmojo")
EQUAL_MEMORY = "equal_memory"
ZOOLOGY_LRS = tuple(float(x) for x in np.logspace(-4, -2, 4))
# Tiny settings of --smoke: L=32, vocab 64, one block, 4 batches an epoch.
SMOKE_SETS = ["data.vocab_size=64", "model.vocab_size=64", "data.num_train=64",
              "data.num_test=32", "train.batch_size=16", "train.eval_batch_size=16", "model.n_layers=2",
              "model.d_state=4", "model.compute.scan_chunk=8"]


def state_bytes(cfg, seq_len: int) -> int:
  """The recurrent state of docs/evals.md, 4 bytes a number: a Mamba sublayer E·N (= 2·d·d_state at
  expand 2), an attention sublayer 2·d·(w + M_f + M_e) (full attention: 2·d·L), an MLP none."""
  per_kind = {Sublayer.MAMBA: cfg.d_inner * cfg.d_state, Sublayer.MLP: 0,
              Sublayer.ATTENTION: 2 * cfg.d_model * (seq_len if cfg.window is None
                                                     else cfg.window + cfg.fading + cfg.eidetic)}
  return 4 * cfg.n_blocks * sum(per_kind[k] for k in cfg.sublayers)


def population_config(args, family: str, variant: str, d_model: int, n: int):
  """The trainer config of one (family, variant, d_model, N): mqar_zoology's, with the sweep's fields."""
  sets = [f"model.d_model={d_model}", f"data.num_kv_pairs={n}", f"data.seq_len={args.seq_len}"]
  if family != "transformer":
    window = args.window
    if variant == EQUAL_MEMORY:
      window += args.n_fading + args.n_eidetic
    chunk = args.window if family in ("bmojo_f", "bmojo") else window   # chunk must divide the window
    sets += [f"model.window={window}", f"model.chunk_size={chunk}"]
  sets += [f"model.n_fading={args.n_fading}", f"model.n_eidetic={args.n_eidetic}",
           f"model.eidetic_per_chunk={args.eidetic_per_chunk}", f"model.store_policy={args.store_policy}",
           f"model.selection={args.selection}"]
  sets += [f"model.compute.dtype={args.dtype}",
           f"model.compute.attn_impl={args.family_attn.get(family, args.attn_impl)}"]
  if args.patience:       # early stopping on a validation split of its own (train.steps.EarlyStopping)
    sets += [f"train.patience={args.patience}", f"train.min_delta={args.min_delta}", f"data.num_val={args.num_val}"]
  config = zoology_config(family, ZOOLOGY_LRS[0], args.epochs, (SMOKE_SETS if args.smoke else []) + sets + args.set)
  config.train.target_accuracy = args.target
  config.train.plot = False
  return config


def population_base(args, config, family: str, variant: str, d_model: int, n: int) -> tuple[dict, object]:
  """(the key fields but learning rate and seed of the runs of `config`, its ModelConfig)."""
  cfg = setup_lib.model_config(config)
  base = {"family": family, "variant": variant, "d_model": d_model, "N": n, "L": int(config.data.seq_len),
          "window": cfg.window if cfg.has_attention else None, "n_fading": cfg.fading, "n_eidetic": cfg.eidetic,
          "eidetic_per_chunk": cfg.eidetic_per_chunk if cfg.eidetic else 0,
          "store_policy": cfg.store_policy.value if cfg.eidetic else "",
          "selection": cfg.selection.value if cfg.eidetic else "", "dtype": cfg.compute.dtype,
          "attn_impl": resolve_attn_impl(cfg.compute.attn_impl).value if cfg.has_attention else "",
          "epochs": args.epochs, "patience": args.patience}
  return base, cfg


def data_check(mq: mqar.MQARConfig, seed: int, count: int = 64) -> int:
  """Examples among the first `count` of stream `seed` where the device's generator and the host's (grain's)
  differ: 0 unless the device's float ops round differently from the CPU's (see train/data/mqar.py)."""
  device = jax.device_get(mqar.generate_batch(mq, seed, np.arange(count)))
  host = mqar.generate_examples(mq, seed, np.arange(count))
  return sum(not all(np.array_equal(device[k][i], host[k][i]) for k in ("inputs", "targets")) for i in range(count))


def train_population(args, config, cfg, base: dict, runs: list, checked: dict) -> tuple[list[dict], float]:
  """Trains `runs` of one population (`config`; `base` its key fields); returns (one record per run, wall s).
  checked: N -> data_check's mismatches, filled on the first population of each N."""
  t0, n = time.time(), base["N"]
  pop = pop_lib.Population(config, runs, steps_per_dispatch=args.steps_per_dispatch)
  if n not in checked:
    checked[n] = data_check(pop.mq, pop.task.eval_source.seed)
    if checked[n]:
      print(f"WARNING: N={n}: {checked[n]} of 64 test examples differ between the device and the host")
  workdir = os.path.join(args.workdir, population_folder(base))
  results = population_loop.train(pop, workdir, progress_bar=not args.no_progress,
                                  save_checkpoints=args.save_checkpoints)
  wall = time.time() - t0
  records = [{**base, "learning_rate": run.learning_rate, "seed": run.seed,
              "steps": res["step"], "stopped_by": res["stopped_by"],
              "test_accuracy": res.get("test_accuracy"), "test_loss": res.get("test_loss"),
              "collapsed": res.get("collapsed"), "test_step": res.get("test_step"),
              "state_bytes": state_bytes(cfg, base["L"]), "params": count_params(cfg),
              "d_state": cfg.d_state, "tokens_per_s": res["tokens_per_s"],
              "population_tokens_per_s": res["population"]["tokens_per_s"], "population_size": len(runs),
              "wall_s": wall, "fraction_beyond_window": res["data"].get("fraction_beyond_window"),
              "data_check_mismatches": checked[n],
              "scan_impl": resolve_scan_impl(cfg.compute.scan_impl).value,
              "device": device_name(), "jax": jax.__version__,
              **({k: res.get(k) for k in ("best_step", "val_accuracy", "val_loss", "min_delta")}
                 if args.patience else {})}
             for run, res in zip(runs, results)]
  return records, wall
