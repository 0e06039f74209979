"""The sweep itself: every population not yet recorded, in one process or as one worker per GPU (`--gpus`),
within `--budget-s`."""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import threading
import time

from benchmarks.common import REPO, write_json
from benchmarks.studies.mqar_sweep.population import (EQUAL_MEMORY, population_base, population_config,
                                                      train_population)
from benchmarks.studies.mqar_sweep.records import (load_records, merge_workers, population_label, record_key,
                                                   results_paths)
from benchmarks.studies.mqar_sweep.report import summarize
from bmojo_jax.train import population as pop_lib


def claim(path: str, label: str) -> bool:
  """True for the one worker that creates <results folder>/claims/<label> (an exclusive create)."""
  folder = os.path.join(os.path.dirname(path), "claims")
  os.makedirs(folder, exist_ok=True)
  try:
    os.close(os.open(os.path.join(folder, label.replace(" ", "_")), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return True
  except FileExistsError:
    return False


def sweep(args) -> str:
  path, sources, _ = results_paths(args)
  records = load_records(sources)
  done = {record_key(r) for r in records}
  if args.worker is not None:   # this worker's own records only; the launcher merges
    path, records = f"{path[:-len('.json')]}.worker{args.worker}.json", []
  variants = [(f, "") for f in args.families]
  if args.equal_memory and "bmojo" in args.families:
    variants.append(("hybrid", EQUAL_MEMORY))
  start, longest, checked = time.time(), 0.0, {}
  cells = [(n, d_model, family, variant, selection) for n in args.kv_pairs for d_model in args.d_models
           for family, variant in variants for selection in args.selections]
  for n, d_model, family, variant, selection in cells:
    a = argparse.Namespace(**{**vars(args), "selection": selection})
    config = population_config(a, family, variant, d_model, n)
    base, cfg = population_base(a, config, family, variant, d_model, n)
    if not cfg.eidetic and selection != args.selections[0]:
      continue        # no eidetic store: no selection to vary, one population
    runs = [pop_lib.Run(lr, seed) for seed in args.seeds for lr in args.lrs
            if record_key({**base, "learning_rate": lr, "seed": seed}) not in done]
    label = population_label(base)
    if not runs:
      print(f"{label}: done, skipped")
      continue
    elapsed = time.time() - start
    if args.budget_s and elapsed + longest > args.budget_s:
      print(f"{label}: not started ({elapsed:.0f} s elapsed + {longest:.0f} s for the longest population "
            f"> --budget-s {args.budget_s}); rerun to continue")
      continue
    if args.worker is not None and not claim(path, f"{label} {base['store_policy']} {base['selection']} "
                                                   f"{base['dtype']} {base['epochs']}"
                                                   + (f" p{base['patience']}" if base["patience"] else "")):
      continue   # another worker has it
    new, wall = train_population(args, config, cfg, base, runs, checked)
    longest = max(longest, wall)
    records += new
    write_json(path, records)
    best = max(new, key=lambda r: r["test_accuracy"] or 0.0)
    print(f"{label}: best test accuracy {best['test_accuracy'] or 0.0:.4f} (lr {best['learning_rate']:.3g}, "
          f"test loss {best['test_loss']:.4f}) in {wall:.0f} s, {best['population_tokens_per_s'] / 1e6:.2f}M "
          f"tokens/s for {len(runs)} runs -> {path}")
  if args.worker is not None:
    print(f"{len(records)} records in {path}")
    return path
  summarize(args, path, records)
  return path


def worker_device_tag(gpu: str) -> str:
  """device_tag() of one of the workers' GPUs, asked in a child process: the launcher never starts a backend
  itself (on a GPU it would take the memory its workers need)."""
  code = "from benchmarks.common import device_tag; print(device_tag())"
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, CUDA_VISIBLE_DEVICES=gpu),
                       capture_output=True, text=True)
  if out.returncode or not out.stdout.strip():
    raise SystemExit(f"--gpus: no device behind CUDA_VISIBLE_DEVICES={gpu}: {out.stderr.strip()[-500:]}")
  return out.stdout.strip().splitlines()[-1]


def launch(args, argv: list[str]) -> str:
  """Runs the sweep as one worker per GPU of `--gpus`, then merges their records into the results file."""
  tag = None if args.smoke else worker_device_tag(args.gpus[0])
  path, _ = merge_workers(args, tag)                 # what a cut run's workers left, merged first
  claims = os.path.join(os.path.dirname(path), "claims")
  for f in glob.glob(os.path.join(claims, "*")):     # claims of a cut run: those populations are not done
    os.remove(f)
  argv = [a for i, a in enumerate(argv) if a != "--gpus" and (i == 0 or argv[i - 1] != "--gpus")
          and not a.startswith("--gpus=")]
  procs = []
  for i, gpu in enumerate(args.gpus):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
    procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.studies.mqar_sweep", *argv, "--no-progress",
                                   "--worker", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))

  def relay(i, proc):                                # each worker's lines, named by its GPU
    for line in proc.stdout:
      print(f"[gpu {args.gpus[i]}] {line}", end="", flush=True)
  threads = [threading.Thread(target=relay, args=(i, p)) for i, p in enumerate(procs)]
  for t in threads:
    t.start()
  codes = [p.wait() for p in procs]
  for t in threads:
    t.join()
  path, records = merge_workers(args, tag)
  summarize(args, path, records)
  failed = [g for g, c in zip(args.gpus, codes) if c]
  if failed:
    raise SystemExit(f"the workers on GPUs {failed} failed (their lines above); the records of every finished "
                     f"population are in {path}, and a rerun continues from there")
  return path
