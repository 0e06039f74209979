"""The sweep's results as Zoology's figure 2 (best accuracy over learning rates against state bytes) and as a
markdown table of the same values."""

from __future__ import annotations

import numpy as np

from benchmarks.common import save_figure
from benchmarks.studies.mqar_sweep.records import best_setting, lr_key
from bmojo_jax.config import Selection


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


def summarize(args, path: str, records: list[dict]) -> str | None:
  """Redraws the figure next to the results file `path` and prints the table of the protocol's records; returns
  the figure's path (None: no record of the protocol: also --patience's)."""
  records = [r for r in records if r.get("patience", 0) == args.patience]
  figure = plot(records, path.replace(".json", ".png"), args.dtype, args.epochs, args.n_eidetic)
  print(f"{len(records)} records in {path}; figure {figure}")
  if figure:
    print(table(records, args.dtype, args.epochs, args.n_eidetic))
  return figure
