"""--recheck: the records of a results file at or above an accuracy, trained again under today's strict rules."""

from __future__ import annotations

import argparse
import os
import time

from benchmarks.common import REPO, RESULTS, write_json
from benchmarks.studies.mqar_sweep.population import EQUAL_MEMORY, population_base, population_config, train_population
from benchmarks.studies.mqar_sweep.records import (accuracy, load_records, matches, population_folder, population_label,
                                                   record_key)
from bmojo_jax import count_params
from bmojo_jax.train import population as pop_lib

RECHECK_MIN = 0.9          # --recheck: the records re-run are those at or above this test accuracy
STANDS_TOLERANCE = 0.01    # a re-checked accuracy this far below the old one still "stands"


def recheck_args(args, r: dict):
  """The sweep's options that rebuild the population config of record r (its key fields; everything else,
  e.g. the vocabulary, comes from --set and --target as in the sweep that wrote it: records hold neither)."""
  a = argparse.Namespace(**vars(args))
  a.seq_len, a.n_fading, a.n_eidetic, a.epochs = r["L"], r["n_fading"], r["n_eidetic"], r["epochs"]
  a.dtype, a.patience = r["dtype"], r["patience"]
  if r["window"] is not None:
    a.window = r["window"] - (r["n_fading"] + r["n_eidetic"] if r["variant"] == EQUAL_MEMORY else 0)
  if r["n_eidetic"]:
    a.eidetic_per_chunk, a.store_policy, a.selection = r["eidetic_per_chunk"], r["store_policy"], r["selection"]
  a.family_attn = {r["family"]: r["attn_impl"]} if r["attn_impl"] else {}
  return a


def recheck_path(args) -> tuple[str, list[str]]:
  """(where --recheck writes, the files whose records count as rechecked): <out>/<stem>_recheck.json and the
  repository's benchmarks/results/<stem>_recheck.json."""
  name = os.path.basename(args.recheck)[:-len(".json")] + "_recheck.json"
  out_dir = args.out or os.environ.get("OUT") or RESULTS
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  return path, [os.path.join(RESULTS, name), path]


def recheck(args) -> str:
  """--recheck FILE: every record of FILE with test_accuracy >= --recheck-min (and every --only field=value),
  trained again from its key fields (family, d_model, N, L, window, M_f, M_e, k_e, store, selection, dtype,
  attention, epochs, learning rate, seed; the population's other runs left out) under today's rules: a strict
  accuracy (`bmojo_jax.losses.token_losses_reference`) with its test loss and `collapsed`. Each new record has "recheck_of"
  (the old record's accuracy, step, stopped_by and file) and "stands": not collapsed and its accuracy at least
  the old one's - STANDS_TOLERANCE. Resumable like the sweep; --dry-run lists the populations and the old
  wall_s they took (the estimate of a re-check's time) and trains nothing."""
  if not os.path.exists(args.recheck):
    raise SystemExit(f"--recheck: no results file {args.recheck}")
  old = [r for r in load_records([args.recheck])
         if (r.get("test_accuracy") or 0.0) >= args.recheck_min and matches(r, args.only)]
  path, sources = recheck_path(args)
  records = load_records(sources)
  done = {record_key(r) for r in records}
  groups: dict[tuple, list[dict]] = {}
  for r in old:
    groups.setdefault(record_key({**r, "learning_rate": 0.0, "seed": 0}), []).append(r)
  estimate = sum(max(r.get("wall_s") or 0.0 for r in rs) for rs in groups.values())
  print(f"{args.recheck}: {len(old)} records with test accuracy >= {args.recheck_min}"
        f"{' and ' + ', '.join(args.only) if args.only else ''} in {len(groups)} populations; they took "
        f"{estimate:.0f} s ({len(done)} already rechecked in {path})")
  start, longest, checked = time.time(), 0.0, {}
  for rs in groups.values():
    r0, todo = rs[0], [r for r in rs if record_key(r) not in done]
    label = population_label(r0)
    print(f"{population_folder(r0)} ({r0.get('device')}, population of {r0.get('population_size')} runs, "
          f"{r0.get('wall_s') or 0.0:.0f} s):")
    for r in rs:
      print(f"  lr {r['learning_rate']:.3g} seed {r['seed']}: {r['test_accuracy']:.4f} at step {r.get('test_step')} "
            f"({r.get('stopped_by')}){'' if r in todo else ', rechecked'}")
    if args.dry_run or not todo:
      continue
    a = recheck_args(args, r0)
    config = population_config(a, r0["family"], r0["variant"], r0["d_model"], r0["N"])
    base, cfg = population_base(a, config, r0["family"], r0["variant"], r0["d_model"], r0["N"])
    rebuilt = record_key({**base, "learning_rate": r0["learning_rate"], "seed": r0["seed"]})
    if rebuilt != record_key(r0):
      raise SystemExit(f"--recheck: the config rebuilt for {label} has key {rebuilt}, the record {record_key(r0)}")
    if r0.get("params") not in (None, count_params(cfg)):
      raise SystemExit(f"--recheck: the model rebuilt for {label} has {count_params(cfg)} parameters, the record "
                       f"{r0['params']}: give the --set overrides of the sweep that wrote {args.recheck}")
    elapsed = time.time() - start
    if args.budget_s and elapsed + longest > args.budget_s:
      print(f"{label}: not started ({elapsed:.0f} s elapsed + {longest:.0f} s for the longest population "
            f"> --budget-s {args.budget_s}); rerun to continue")
      continue
    new, wall = train_population(a, config, cfg, base, [pop_lib.Run(r["learning_rate"], r["seed"]) for r in todo],
                                 checked)
    longest = max(longest, wall)
    for r, n in zip(todo, new):
      n["recheck_of"] = {"test_accuracy": r["test_accuracy"], "test_step": r.get("test_step"),
                         "stopped_by": r.get("stopped_by"), "wall_s": r.get("wall_s"), "device": r.get("device"),
                         "file": os.path.relpath(os.path.abspath(args.recheck), REPO)}
      n["stands"] = bool(not n["collapsed"] and accuracy(n) >= r["test_accuracy"] - STANDS_TOLERANCE)
      print(f"{label} lr {n['learning_rate']:.3g} seed {n['seed']}: {r['test_accuracy']:.4f} -> strict "
            f"{n['test_accuracy']:.4f}, test loss {n['test_loss']:.4f} at step {n['test_step']}"
            f"{', COLLAPSED' if n['collapsed'] else ''}: {'stands' if n['stands'] else 'does NOT stand'}")
    records += new
    write_json(path, records)
  if not args.dry_run:
    stand = sum(r["stands"] for r in records)
    print(f"{len(records)} records in {path}: {stand} stand, {len(records) - stand} do not")
  return path
