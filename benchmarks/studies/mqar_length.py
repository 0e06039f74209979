"""MQAR recall on sequences longer than trained, with B'MOJO's eidetic store grown at inference (issue #15).

    python3 -m benchmarks.studies.mqar_selection --train-steps 1500 --train-dir /tmp/tiny   # a tiny B'MOJO, if none
    python3 -m benchmarks.studies.mqar_length --workdir /tmp/tiny [--lengths 1,2,4] [--grow 1,2,4]

RUN (--workdir) is a trained MQAR run: a `bmojo-train` workdir or a run folder of `benchmarks/studies/mqar_sweep
--save-checkpoints` (read only). For every length factor f and store factor g the run's latest checkpoint is
loaded into the trainer's own setup with `data.seq_len` = f·L and `model.n_eidetic` = g·M_e (a size without
parameters: the trained weights are used as they are; g > 1 only for a model with an eidetic store), and the
trainer's evaluation (`train.steps.evaluate`) scores the MQAR test set generated at that length with the
trained N. MQAR places each query a power-law distance after the key-value prefix, so a longer sequence puts
more of the queries' values beyond the window (`fraction_beyond_window` in each record).

Writes a list of records (--out, default benchmarks/results/mqar_length_<device>.json; appended to) and a
figure next to it (<out>_<run folder name>.png): test accuracy against f·L, a line per store size.
"""

from __future__ import annotations

import argparse
import os

import jax
import ml_collections

from benchmarks.common import RESULTS, append_results, device_name, device_tag, ints, save_figure
from bmojo_jax.train import runs, steps
from bmojo_jax.train.data import mqar


def evaluate_lengths(workdir: str, config: ml_collections.ConfigDict, lengths: list[int], stores: list[int]):
  """Yields (L, M_e, metrics) for the run's latest checkpoint on MQAR test sequences of each of `lengths` tokens
  with each eidetic store size of `stores`: the checkpoint is restored once per length (its test set), and each
  store size is a model without new parameters over the same weights."""
  for length in lengths:
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.seq_len = length
    base, params, step = runs.load_run(workdir, config)
    window = base.cfg.window
    beyond = mqar.fraction_beyond_window(base.task.eval_source, window) if window else None
    for m_e in stores:
      setup = runs.with_overrides(base, params, {"n_eidetic": m_e} if m_e != base.cfg.eidetic else {})
      yield length, m_e, {**steps.evaluate(setup, params), "step": int(step), "fraction_beyond_window": beyond}


def plot(records: list[dict], path: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for m_e in sorted({r["n_eidetic"] for r in records}):
    xy = sorted((r["L"], r["accuracy"]) for r in records if r["n_eidetic"] == m_e)
    trained = " (trained)" if m_e == records[0]["trained_n_eidetic"] else ""
    ax.plot([p[0] for p in xy], [p[1] for p in xy], "o-", label=f"M_e {m_e}{trained}")
  ax.axvline(records[0]["trained_L"], color="gray", ls=":", lw=1)
  lengths = sorted({r["L"] for r in records})
  ax.set_xscale("log", base=2)
  ax.set_xticks(lengths, [str(n) for n in lengths])
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.set(xlabel="sequence length L (trained: dotted)", ylabel="MQAR test accuracy", ylim=(0, 1.02),
         title=records[0]["title"])
  ax.title.set_fontsize(8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return save_figure(fig, path)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a trained MQAR run (its latest checkpoint is read)")
  p.add_argument("--lengths", default="1,2,4", help="factors of the trained L")
  p.add_argument("--grow", default="1,2,4", help="factors of the trained n_eidetic (B'MOJO only)")
  p.add_argument("--out", help="JSON path (default benchmarks/results/mqar_length_<device>.json)")
  p.add_argument("--note", default="", help="stored in every record")
  args = p.parse_args(argv)
  config = runs.load_config(args.workdir)
  if config.data.kind != "mqar":
    p.error(f"{args.workdir} trained on data.kind={config.data.kind!r}: this benchmark evaluates MQAR runs")
  trained_l, trained_m = int(config.data.seq_len), int(config.model.n_eidetic)
  vocab = int(config.data.vocab_size or config.model.vocab_size)
  too_long = [f * trained_l for f in ints(args.lengths) if f * trained_l >= vocab]
  if too_long:
    p.error(f"MQAR needs vocab_size > L: the run's vocabulary of {vocab} cannot make sequences of {too_long} "
            "tokens; give smaller --lengths")
  grows = ints(args.grow) if trained_m else [1]
  m = config.model
  title = (f"{m.family}, {m.get('selection', 'innovation')} selection: d {m.d_model}, N {config.data.num_kv_pairs}, "
           f"w {m.window}, k_e {m.eidetic_per_chunk}/{m.chunk_size}, trained L {trained_l}, M_e {trained_m}")
  records = []
  for length, m_e, r in evaluate_lengths(args.workdir, config, [f * trained_l for f in ints(args.lengths)],
                                          [g * trained_m for g in grows]):
    records.append({"family": str(m.family), "L": length, "n_eidetic": m_e, "trained_L": trained_l,
                    "trained_n_eidetic": trained_m, "N": int(config.data.num_kv_pairs), "window": m.window, **r,
                    "workdir": os.path.abspath(args.workdir), "title": title, "note": args.note,
                    "device": device_name(), "jax": jax.__version__})
    beyond = r["fraction_beyond_window"]
    print(f"L {length:5d}  M_e {m_e:4d}: accuracy {r['accuracy']:.4f}"
          + (f" ({beyond:.2f} of the values beyond the window)" if beyond is not None else ""))
  out = args.out or os.path.join(RESULTS, f"mqar_length_{device_tag()}.json")
  append_results(records, out)
  figure = out.replace(".json", f"_{os.path.basename(os.path.normpath(args.workdir))}.png")
  print(f"-> {out}, {plot(records, figure)}")
  return records


if __name__ == "__main__":
  main()
