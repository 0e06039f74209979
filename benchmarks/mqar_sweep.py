"""The MQAR sweep of docs/evals.md: families × d_model × learning rates × N at L=256, window 32, on one device.

    python3 -m benchmarks.mqar_sweep --budget-s 480                       # resumable; -> $OUT/mqar_sweep_<device>.json
    python3 -m benchmarks.mqar_sweep --families bmojo,hybrid --d-models 128 --kv-pairs 32 --epochs 4
    python3 -m benchmarks.mqar_sweep --throughput --runs 1,4,8           # population vs single-run trainer tokens/s
    python3 benchmarks/mqar_sweep.py --smoke                              # tiny; ~2 min on 2 CPU cores
    python3 -m benchmarks.mqar_sweep --table benchmarks/results/mqar_sweep_h200.json   # best accuracies, markdown
    python3 -m benchmarks.mqar_sweep --recheck benchmarks/results/mqar_sweep_h200.json [--only d_model=128]

One population (`train.population`) per (family, d_model, N) trains the learning rates (× `--seeds`) together
on the same data stream, each run stopping at test accuracy 0.99. The model and training settings are
`benchmarks/mqar_zoology.py`'s (Zoology: vocab 8192, batch 256, 100k train / 3k test, AdamW wd 0.1, cosine,
no warmup, evaluation every half epoch); `--set key=value` overrides any config field. Families: the five,
plus the equal-memory baseline of docs/evals.md, a Hybrid whose window is B'MOJO's w + M_f + M_e
(`hybrid` with `variant` "equal_memory"); the Transformer is the full-attention reference.

`--selection` picks B'MOJO's selection score (`bmojo_jax.config.Selection`; docs/mqar.md, "Selection variants"),
recorded, like the store policy, in each record and its key; `--save-checkpoints` keeps every run's final state
for `benchmarks/mqar_selection.py`.

Results: one record per run in `<out>/mqar_sweep_<device>.json` (out: --out, else $OUT, else
benchmarks/results), written after each population. A rerun skips the runs already recorded there or in
`benchmarks/results/mqar_sweep_<device>.json` (copy a returned file there to resume). `--budget-s` stops
starting populations once the elapsed time plus the longest population so far would pass it. The figure
(`mqar_sweep_<device>.png`, like Zoology's figure 2: best accuracy over learning rates against state bytes,
a line per family, a panel per N) is redrawn from all records at the end, and the same values are printed as a
markdown table (`table`: per model, d_model and N the best learning rate's mean over seeds, its run count and
range).

`--gpus 0,1` spreads the populations over those GPUs: one worker process per GPU (`CUDA_VISIBLE_DEVICES`; a
population on a GPU of its own, since two sharing one ran much slower), each taking the next population that
no worker has claimed (`<out>/claims/`), so the fast and slow populations balance themselves. Workers write
`mqar_sweep_<device>.worker<i>.json`; the launcher merges them into the results file when they end, and a rerun
merges what a cut run's workers left.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):   # run as a file: the repository root on the path, as with `python3 -m`
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import append_results, device_name, device_tag, ints, save_figure, write_json  # noqa: E402
from benchmarks.mqar_zoology import zoology_config  # noqa: E402
from bmojo_jax import Sublayer, count_params  # noqa: E402
from bmojo_jax.config import Selection  # noqa: E402
from bmojo_jax.kernels import resolve_attn_impl, resolve_scan_impl  # noqa: E402
from train import metrics as metrics_lib  # noqa: E402
from train import population as pop_lib  # noqa: E402
from train import setup as setup_lib  # noqa: E402
from train import trainer  # noqa: E402
from train.data import mqar  # noqa: E402

FAMILIES = ("transformer", "mamba", "hybrid", "bmojo_f", "bmojo")
EQUAL_MEMORY = "equal_memory"
ZOOLOGY_LRS = tuple(float(x) for x in np.logspace(-4, -2, 4))
KEY_FIELDS = ("family", "variant", "d_model", "N", "L", "window", "n_fading", "n_eidetic", "eidetic_per_chunk",
              "store_policy", "selection", "dtype", "attn_impl", "learning_rate", "seed", "epochs")
# Tiny settings of --smoke: L=32, vocab 64, one block, 4 batches an epoch.
RECHECK_MIN = 0.9          # --recheck: the records re-run are those at or above this test accuracy
STANDS_TOLERANCE = 0.01    # a re-checked accuracy this far below the old one still "stands"
SMOKE_SETS = ["data.vocab_size=64", "model.vocab_size=64", "data.num_train=64",
              "data.num_test=32", "train.batch_size=16", "train.eval_batch_size=16", "model.n_layers=2",
              "model.d_state=4", "model.compute.scan_chunk=8"]


def floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x]


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
  config = zoology_config(family, ZOOLOGY_LRS[0], args.epochs, (SMOKE_SETS if args.smoke else []) + sets + args.set)
  config.train.target_accuracy = args.target
  config.train.plot = False
  return config


def record_key(r: dict) -> tuple:
  """What makes two records one run; floats to 6 significant digits (a learning rate given on the command line
  as 2.15443469e-3 is Zoology's 10^-2.6667, recorded earlier as 0.00215443)."""
  return tuple(float(f"{r[k]:.6g}") if isinstance(r[k], float) else r[k] for k in KEY_FIELDS)


def upgrade_record(r: dict) -> dict:
  """A record written before a key field existed, with the value its run had: the paper's innovation test
  (`selection` came in with issue #15's selection variants; "" without an eidetic store, like store_policy).
  `attn_impl` is "" for Mamba, which has no attention (older records named the resolved implementation)."""
  r = {"selection": Selection.INNOVATION.value if r.get("n_eidetic") else "", **r}
  return {**r, "attn_impl": ""} if r["family"] == "mamba" else r


def load_records(paths: list[str]) -> list[dict]:
  records, seen = [], set()
  for path in paths:
    if os.path.exists(path):
      with open(path) as f:
        for r in map(upgrade_record, json.load(f)):
          if record_key(r) not in seen:
            seen.add(record_key(r))
            records.append(r)
  return records


def data_check(mq: mqar.MQARConfig, seed: int, count: int = 64) -> int:
  """Examples among the first `count` of stream `seed` where the device's generator and the host's (grain's)
  differ: 0 unless the device's float ops round differently from the CPU's (see train/data/mqar.py)."""
  device = jax.device_get(mqar.generate_batch(mq, seed, np.arange(count)))
  host = mqar.generate_examples(mq, seed, np.arange(count))
  return sum(not all(np.array_equal(device[k][i], host[k][i]) for k in ("inputs", "targets")) for i in range(count))


def results_paths(args, tag: str | None = None) -> tuple[str, list[str], list[str]]:
  """(the results file, the files whose records count as done: the repository's, the results file and the
  worker files, and the worker files alone: what a `--gpus` run leaves until it merges them). tag: the
  device's (default: this process's)."""
  tag = "cpu_smoke" if args.smoke else tag or device_tag()
  out_dir = args.out or os.environ.get("OUT") or os.path.join(REPO, "benchmarks", "results")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"mqar_sweep_{tag}.json")
  workers = sorted(glob.glob(glob.escape(path[:-len(".json")]) + ".worker*.json"))
  return path, [os.path.join(REPO, "benchmarks", "results", f"mqar_sweep_{tag}.json"), path] + workers, workers


def merge_workers(args, tag: str | None) -> tuple[str, list[dict]]:
  """Moves the worker files' records into the results file; returns (its path, all records)."""
  path, sources, workers = results_paths(args, tag)
  records = load_records(sources)
  write_json(path, records)
  for f in workers:
    os.remove(f)
  return path, records


def population_folder(base: dict) -> str:
  """The folder (under --workdir) of one population's run folders, named by every key field but the learning rate
  and seed (the run folders' names): two sweeps that differ in M_e or k_e, say, never share run folders."""
  name = base["family"] + (f"_{base['variant']}" if base["variant"] else "")
  name += f"_d{base['d_model']}_N{base['N']}_L{base['L']}"
  if base["window"]:
    name += f"_w{base['window']}"
  if base["n_fading"]:
    name += f"_mf{base['n_fading']}"
  if base["n_eidetic"]:
    name += f"_me{base['n_eidetic']}_ke{base['eidetic_per_chunk']}_{base['store_policy']}_{base['selection']}"
  return name + (f"_{base['attn_impl']}" if base["attn_impl"] else "") + f"_{base['dtype']}_e{base['epochs']}"


def claim(path: str, label: str) -> bool:
  """True for the one worker that creates <results folder>/claims/<label> (an exclusive create)."""
  folder = os.path.join(os.path.dirname(path), "claims")
  os.makedirs(folder, exist_ok=True)
  try:
    os.close(os.open(os.path.join(folder, label.replace(" ", "_")), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return True
  except FileExistsError:
    return False


def population_base(args, config, family: str, variant: str, d_model: int, n: int) -> tuple[dict, object]:
  """(the key fields but learning rate and seed of the runs of `config`, its ModelConfig)."""
  cfg = setup_lib.model_config(config)
  base = {"family": family, "variant": variant, "d_model": d_model, "N": n, "L": int(config.data.seq_len),
          "window": cfg.window if cfg.has_attention else None, "n_fading": cfg.fading, "n_eidetic": cfg.eidetic,
          "eidetic_per_chunk": cfg.eidetic_per_chunk if cfg.eidetic else 0,
          "store_policy": cfg.store_policy.value if cfg.eidetic else "",
          "selection": cfg.selection.value if cfg.eidetic else "", "dtype": cfg.compute.dtype,
          "attn_impl": resolve_attn_impl(cfg.compute.attn_impl).value if cfg.has_attention else "",
          "epochs": args.epochs}
  return base, cfg


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
  results = pop.train(workdir, progress_bar=not args.no_progress, save_checkpoints=args.save_checkpoints)
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
              "device": device_name(), "jax": jax.__version__}
             for run, res in zip(runs, results)]
  return records, wall


def population_label(base: dict) -> str:
  return f"{base['family']}{'(' + base['variant'] + ')' if base['variant'] else ''} d{base['d_model']} N{base['N']}"


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
  for n in args.kv_pairs:
    for d_model in args.d_models:
      for family, variant in variants:
        config = population_config(args, family, variant, d_model, n)
        base, cfg = population_base(args, config, family, variant, d_model, n)
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
                                                       f"{base['dtype']} {base['epochs']}"):
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


def matches(r: dict, only: list[str]) -> bool:
  """Whether record r has every field=value of `only` (numbers compared as numbers, e.g. d_model=128)."""
  for item in only:
    key, _, value = item.partition("=")
    have = r.get(key)
    if isinstance(have, (int, float)) and not isinstance(have, bool):
      if float(f"{float(value):.6g}") != float(f"{have:.6g}"):
        return False
    elif str(have) != value:
      return False
  return True


def recheck_args(args, r: dict):
  """The sweep's options that rebuild the population config of record r (its key fields; everything else,
  e.g. the vocabulary, comes from --set and --target as in the sweep that wrote it: records hold neither)."""
  a = argparse.Namespace(**vars(args))
  a.seq_len, a.n_fading, a.n_eidetic, a.epochs = r["L"], r["n_fading"], r["n_eidetic"], r["epochs"]
  a.dtype = r["dtype"]
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
  out_dir = args.out or os.environ.get("OUT") or os.path.join(REPO, "benchmarks", "results")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  return path, [os.path.join(REPO, "benchmarks", "results", name), path]


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


def summarize(args, path: str, records: list[dict]) -> str | None:
  """Redraws the figure next to the results file `path` and prints the table of the protocol's records; returns
  the figure's path (None: no record of the protocol)."""
  figure = plot(records, path.replace(".json", ".png"), args.dtype, args.epochs, args.n_eidetic)
  print(f"{len(records)} records in {path}; figure {figure}")
  if figure:
    print(table(records, args.dtype, args.epochs, args.n_eidetic))
  return figure


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
    procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.mqar_sweep", *argv, "--no-progress",
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


def best_setting(records: list[dict]) -> tuple[float, float, list[float]]:
  """Zoology's figure-2 value of one model: the best over learning rates of the test accuracy averaged over
  seeds, as (that mean, its learning rate, its runs' accuracies, each as `accuracy` counts it). A learning rate
  counts to 6 significant digits (`lr_key`: 2.15443469e-3 given on one command line is the 0.00215443 of
  another), and runs with cuDNN and with the reference attention pool (one function; docs/mqar.md, session 10)."""
  groups: dict[float, list[float]] = {}
  for r in records:
    groups.setdefault(lr_key(r), []).append(accuracy(r))
  return max(((float(np.mean(accs)), lr, accs) for lr, accs in groups.items()), key=lambda row: row[0])


def lr_key(r: dict) -> float:
  """A record's learning rate to 6 significant digits: what makes two rates one (best_setting)."""
  return float(f"{r['learning_rate']:.6g}")


def accuracy(r: dict) -> float:
  """A record's test accuracy as the figure and table count it: 0 for a collapsed run (test loss at ln V,
  `train.steps.collapsed`) or one without an evaluation."""
  return 0.0 if r.get("collapsed") else r["test_accuracy"] or 0.0


def model_name(r: dict) -> str:
  """The figure's and the table's name of a record's model: family (+ variant, k_e, selection, store policy; M_e
  is the figures' x axis or filter)."""
  text = f"{r['family']} ({r['variant'].replace('_', ' ')})" if r["variant"] else r["family"]
  if r["eidetic_per_chunk"]:
    text += f", k_e {r['eidetic_per_chunk']}"
  if r["selection"] and r["selection"] != Selection.INNOVATION:
    text += f", {r['selection']} selection"
  return text + (f", {r['store_policy']} store" if r["store_policy"] == "fifo" else "")


def table(records: list[dict], dtype: str, epochs: int, n_eidetic: int) -> str:
  """A markdown table of the figure's values: per model, d_model and N the best accuracy (the mean over seeds at
  the best learning rate), with that rate, the number of runs (seeds), their range where there are several, and
  their mean test loss where the records hold it.
  Only the protocol's runs (`dtype`, `epochs`, B'MOJO at M_e = `n_eidetic`)."""
  records = [r for r in records if r["dtype"] == dtype and r["epochs"] == epochs and r["n_eidetic"] in (0, n_eidetic)]
  ns = sorted({r["N"] for r in records})
  cells: dict[tuple, list[dict]] = {}
  state = {}   # (model, d_model) -> state bytes (independent of N)
  for r in records:
    cells.setdefault((model_name(r), r["d_model"], r["N"]), []).append(r)
    state[model_name(r), r["d_model"]] = r["state_bytes"]
  lines = ["| model | d_model | state bytes | " + " | ".join(f"N {n}" for n in ns) + " |",
           "|---|---|---|" + "---|" * len(ns)]
  for (name, d_model), size in sorted(state.items()):
    row = []
    for n in ns:
      if (name, d_model, n) not in cells:
        row.append("–")
        continue
      mean, lr, accs = best_setting(cells[name, d_model, n])
      seeds = f"{len(accs)} runs: {min(accs):.3f}–{max(accs):.3f}" if len(accs) > 1 else "1 run"
      losses = [r.get("test_loss") for r in cells[name, d_model, n] if lr_key(r) == lr]
      if all(x is not None for x in losses):     # records before issue 31 hold no test loss
        seeds += f"; loss {np.mean(losses):.3f}"
      row.append(f"{mean:.3f} ({lr:.3g}; {seeds})")
    lines.append(f"| {name} | {d_model} | {size / 1e3:.0f}k | " + " | ".join(row) + " |")
  return "\n".join(lines)


def plot(records: list[dict], out_path: str, dtype: str, epochs: int, n_eidetic: int) -> str | None:
  """Best test accuracy over learning rates (mean over seeds) against state bytes: a line per family
  (+ variant, selection, store policy) through its d_models, a panel per N. Only the protocol's runs (`dtype`,
  `epochs`, B'MOJO at M_e = `n_eidetic`); B'MOJO's M_e sweep goes to a second figure, <out>_me.png, accuracy
  against M_e."""
  records = [r for r in records if r["dtype"] == dtype and r["epochs"] == epochs]
  if not records:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  def panels(x_of, line_of, keep, xlabel: str, xscale: str, path: str) -> str:
    ns = sorted({r["N"] for r in records})
    names = sorted({line_of(r) for r in records if keep(r)})
    colors = dict(zip(names, plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors))  # same in every panel
    fig, axes = plt.subplots(1, len(ns), figsize=(4.5 * len(ns), 4), squeeze=False)
    for ax, n in zip(axes[0], ns):
      groups: dict[tuple, list[dict]] = {}
      for r in records:
        if r["N"] == n and keep(r):
          groups.setdefault((line_of(r), r["d_model"], x_of(r)), []).append(r)
      lines: dict[str, list[tuple[float, float]]] = {}
      for (line, _, x), rs in groups.items():
        lines.setdefault(line, []).append((x, best_setting(rs)[0]))
      for line, xy in sorted(lines.items()):
        xy.sort()
        ax.plot([p[0] for p in xy], [p[1] for p in xy], "o-", label=line, markersize=4, color=colors[line])
      ax.set(xscale=xscale, xlabel=xlabel, ylabel="MQAR accuracy (best lr)", ylim=(0, 1.02),
             title=f"N = {n} key-value pairs")
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # log axis: label the decades only
      ax.grid(alpha=0.3)
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return save_figure(fig, path)

  out = panels(lambda r: r["state_bytes"], model_name, lambda r: r["n_eidetic"] in (0, n_eidetic), "state size (bytes)",
               "log", out_path)
  if any(r["n_eidetic"] not in (0, n_eidetic) for r in records):
    innovation_score = lambda r: (r["family"] == "bmojo" and r["selection"] == Selection.INNOVATION
                                  and r["store_policy"] == "score")
    panels(lambda r: r["n_eidetic"], lambda r: f"{model_name(r)}, d_model {r['d_model']}", innovation_score,
           "M_e (eidetic tokens in the store)", "linear", out_path.replace(".png", "_me.png"))
  return out


def throughput(args) -> str:
  """Aggregate tokens/s of populations of R runs vs the single-run trainer (grain data, a Python step loop),
  at one (family, d_model, N)."""
  family, d_model, n = args.families[0], args.d_models[0], args.kv_pairs[0]
  config = population_config(args, family, "", d_model, n)
  config.train.target_accuracy = 0.0
  records = []
  base = None
  if args.baseline_steps:
    # The single-run trainer: its logged tokens/s per interval of log_every steps, the first (compile) dropped.
    single = ml_collections.ConfigDict(config.to_dict())
    t = single.train
    t.num_steps, t.log_every, t.eval_every = args.baseline_steps, max(1, args.baseline_steps // 5), 0
    t.checkpoint_every, t.progress_bar, t.plot = args.baseline_steps, False, False
    single.data.num_test = min(int(single.data.num_test), int(t.eval_batch_size))
    with tempfile.TemporaryDirectory() as workdir:
      trainer.train(single, workdir)
      intervals = [r["tokens_per_s"] for r in metrics_lib.read_metrics(workdir) if r["split"] == "train"][1:]
    base = float(np.median(intervals))
    records.append({"mode": "trainer", "runs": 1, "tokens_per_s": base, "speedup": 1.0})
    print(f"single-run trainer: {base / 1e6:.3f}M tokens/s")
  for size in args.runs:
    runs = [pop_lib.Run(args.lrs[i % len(args.lrs)], i // len(args.lrs)) for i in range(size)]
    try:
      pop = pop_lib.Population(config, runs, steps_per_dispatch=args.steps_per_dispatch)
      tps = pop_lib.tokens_per_second(pop, dispatches=args.dispatches)
      rec = {"mode": "population", "runs": size, "tokens_per_s": tps, "speedup": tps / base if base else None,
             "steps_per_dispatch": pop.steps_per_dispatch}
      if args.profile:
        rec["profile"] = profile_population(pop, args.profile, f"{args.label or family}_r{size}")
    except Exception as e:  # pylint: disable=broad-except  (out of memory at large R: recorded, next R)
      rec = {"mode": "population", "runs": size, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    records.append(rec)
    print(rec)
  cfg = setup_lib.model_config(config)
  for r in records:
    r.update(family=family, d_model=d_model, N=n, L=int(config.data.seq_len), batch_size=int(config.train.batch_size),
             params=count_params(cfg), scan_impl=resolve_scan_impl(cfg.compute.scan_impl).value,
             attn_impl=resolve_attn_impl(cfg.compute.attn_impl).value,
             dtype=cfg.compute.dtype, label=args.label, overrides=args.set, device=device_name(),
             jax=jax.__version__)
  out_dir = args.out or os.environ.get("OUT") or os.path.join(REPO, "benchmarks", "results")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"mqar_sweep_throughput_{'cpu_smoke' if args.smoke else device_tag()}.json")
  append_results(records, path) if args.append else write_json(path, records)
  print(f"-> {path}")
  return path


def profile_population(pop: pop_lib.Population, out_dir: str, name: str, dispatches: int = 2) -> dict:
  """GPU ms per training step by source line (train_step_bench's trace parsing) over `dispatches` dispatches
  of the whole population; writes <out_dir>/<name>_ops.json."""
  from benchmarks import train_step_bench as tsb  # pylint: disable=g-import-not-at-top
  state = pop.init_state()
  state = pop.dispatch(state)[0]
  jax.block_until_ready(state)
  trace_dir = os.path.join(tempfile.mkdtemp(), "trace")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(dispatches):
      state = pop.dispatch(state)[0]
    jax.block_until_ready(state)
  traces = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not traces:
    return {"error": f"no perfetto trace under {trace_dir}"}
  steps = dispatches * pop.steps_per_dispatch
  ops = tsb.op_times(traces[0], steps)
  labels = tsb.hlo_sources(pop._dispatch.lower(state).compile().as_text())  # pylint: disable=protected-access
  by_source = {}
  for op, (ms, _) in ops.items():
    key = labels.get(op, "").split(" [")[0] or op.split(".")[0]
    by_source[key] = by_source.get(key, 0.0) + ms
  summary = {"gpu_ms_per_step": sum(ms for ms, _ in ops.values()), "runs": pop.size,
             "by_source": dict(sorted(by_source.items(), key=lambda kv: -kv[1]))}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, name + "_ops.json"), "w") as f:
    json.dump(summary, f, indent=1)
  top = dict(list(summary["by_source"].items())[:20])
  print(f"{name}: {summary['gpu_ms_per_step']:.2f} GPU ms per step; top sources:")
  for k, v in top.items():
    print(f"  {v:8.3f} ms  {k}")
  return {"gpu_ms_per_step": summary["gpu_ms_per_step"], "top_sources": top}


# Defaults of the options left unset: the protocol's, or tiny ones for --smoke (L=32, window 8, a minute or two).
DEFAULTS = dict(d_models="64,128,256", kv_pairs="16,32,64", lrs=",".join(f"{x:.6g}" for x in ZOOLOGY_LRS),
                seq_len=256, window=32, n_fading=8, n_eidetic=80, eidetic_per_chunk=16, epochs=8,
                runs="1,4,8,16", dispatches=5, baseline_steps=250)
SMOKE_DEFAULTS = dict(d_models="16", kv_pairs="4", lrs="3e-3,1e-2", seq_len=32, window=8, n_fading=2, n_eidetic=8,
                      eidetic_per_chunk=4, epochs=2, runs="1,2", dispatches=2, baseline_steps=20)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--families", default=",".join(FAMILIES),
                 help="comma-separated family[:attn_impl], of " + ", ".join(FAMILIES) + " (attn_impl: --attn-impl's; "
                      "the equal-memory Hybrid takes the Hybrid's), e.g. transformer:cudnn,hybrid:cudnn,bmojo")
  p.add_argument("--d-models", help="default 64,128,256")
  p.add_argument("--lrs", help="default Zoology's logspace(-4, -2, 4)")
  p.add_argument("--kv-pairs", help="N values; default 16,32,64")
  p.add_argument("--seeds", default="0", help="seeds per learning rate (each adds a run to the population)")
  p.add_argument("--seq-len", type=int, help="L; default 256")
  p.add_argument("--window", type=int, help="w; default 32")
  p.add_argument("--n-fading", type=int, help="M_f of B'MOJO(-F); default 8 (docs/mqar.md's 99%% run)")
  p.add_argument("--n-eidetic", type=int, help="M_e of B'MOJO; default 80 (w + M_f + M_e = 120 <= L/2)")
  p.add_argument("--eidetic-per-chunk", type=int, help="k_e of B'MOJO; default 16")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay fp32); default bfloat16")
  p.add_argument("--attn-impl", default="reference",
                 help="reference (default) | pallas | cudnn, for families without their own :attn_impl. cuDNN "
                      "(no memory tokens: Transformer, Hybrid) trains like the reference in populations: 3 of 4 "
                      "seeds against 4 of 4 reached 0.99 (docs/mqar.md)")
  p.add_argument("--store-policy", default="score", help="B'MOJO's eidetic store: score (default) or fifo")
  p.add_argument("--selection", default=Selection.INNOVATION.value, choices=[s.value for s in Selection],
                 help="B'MOJO's selection score (docs/mqar.md, 'Selection variants'); default the paper's innovation")
  p.add_argument("--no-equal-memory", dest="equal_memory", action="store_false",
                 help="skip the Hybrid with window w + M_f + M_e")
  p.add_argument("--epochs", type=int, help="default 8 (Zoology: 64)")
  p.add_argument("--target", type=float, default=0.99, help="per-run early stop at this test accuracy")
  p.add_argument("--steps-per-dispatch", type=int, default=64, help="at most; lands on every evaluation")
  p.add_argument("--set", action="append", default=[], help="config override key=value, e.g. model.d_state=16")
  p.add_argument("--budget-s", type=float, default=0.0, help="stop starting populations past this (0: none)")
  p.add_argument("--workdir", help="run directories (default <tmp>/mqar_sweep)")
  p.add_argument("--out", help="results folder (default $OUT, else benchmarks/results; --smoke: a temp folder)")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--gpus", help="spread the populations over these GPUs, e.g. 0,1: one worker process each")
  p.add_argument("--worker", type=int, help=argparse.SUPPRESS)   # set by --gpus for its workers
  p.add_argument("--save-checkpoints", action="store_true",
                 help="keep each run's final state as a trainer checkpoint in its run folder (for "
                      "benchmarks/mqar_selection.py --workdir, bmojo-eval)")
  p.add_argument("--smoke", action="store_true", help="tiny models and data, results in a temp folder")
  p.add_argument("--table", nargs="?", const="", metavar="JSON",
                 help="train nothing: print the best accuracies of a results file (default: this device's) as a "
                      "markdown table and redraw its figure")
  p.add_argument("--recheck", metavar="JSON",
                 help="re-run, with the strict accuracy rule (issue 31), each record of this results file with "
                      "test accuracy >= --recheck-min; writes <out>/<name>_recheck.json (resumable). Give the "
                      "--set overrides of the sweep that wrote it (records do not hold them)")
  p.add_argument("--recheck-min", type=float, default=RECHECK_MIN, help="--recheck: default 0.9")
  p.add_argument("--only", action="append", default=[], metavar="FIELD=VALUE",
                 help="--recheck: only records with this field value, e.g. --only d_model=128 (repeatable)")
  p.add_argument("--dry-run", action="store_true", help="--recheck: list the records and populations, train nothing")
  p.add_argument("--throughput", action="store_true", help="measure tokens/s instead of sweeping")
  p.add_argument("--runs", help="--throughput: population sizes; default 1,4,8,16")
  p.add_argument("--dispatches", type=int, help="--throughput: timed dispatches per size; default 5")
  p.add_argument("--baseline-steps", type=int, help="--throughput: single-run trainer steps (0: none); default 250")
  p.add_argument("--profile", help="--throughput: trace each population into this folder, GPU ms by source line")
  p.add_argument("--label", default="", help="--throughput: a name stored in the records")
  p.add_argument("--append", action="store_true", help="--throughput: add to the results file, not replace it")
  args = p.parse_args(argv)
  for name, value in (SMOKE_DEFAULTS if args.smoke else DEFAULTS).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.smoke:
    args.out = args.out or os.path.join(tempfile.gettempdir(), "mqar_sweep_smoke")
  args.workdir = args.workdir or os.path.join(tempfile.gettempdir(), "mqar_sweep_smoke" if args.smoke else "mqar_sweep",
                                              "runs")
  args.family_attn = dict(f.split(":", 1) for f in args.families.split(",") if ":" in f)
  args.families = [f.split(":", 1)[0] for f in args.families.split(",")]
  unknown = set(args.families) - set(FAMILIES)
  if unknown:
    p.error(f"unknown families {sorted(unknown)}; choose from {FAMILIES}")
  args.d_models, args.kv_pairs, args.seeds, args.runs = (ints(args.d_models), ints(args.kv_pairs), ints(args.seeds),
                                                         ints(args.runs))
  args.lrs = floats(args.lrs)
  args.gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else []
  if args.gpus and args.throughput:
    p.error("--gpus spreads a sweep's populations; --throughput measures one device")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.profile:   # kernels attributed one by one: no CUDA graphs (set before jax's backend starts)
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
  if args.throughput:
    throughput(args)
  elif args.recheck:
    recheck(args)
  elif args.table is not None:
    path, sources, _ = results_paths(args)
    if args.table:
      if not os.path.exists(args.table):
        raise SystemExit(f"--table: no results file {args.table}")
      path, sources = args.table, [args.table]
    if not summarize(args, path, load_records(sources)):
      raise SystemExit(f"--table: no records of {args.dtype}, {args.epochs} epochs in {sources} (see --dtype, "
                       "--epochs)")
  elif args.gpus and args.worker is None:
    launch(args, list(sys.argv[1:] if argv is None else argv))
  else:
    sweep(args)


if __name__ == "__main__":
  main()
