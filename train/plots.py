"""Loss and accuracy curves from a run's metrics.jsonl as a PNG.

    python -m bmojo_jax.train.plots runs/default  # writes runs/default/curves.png
"""

import os
import sys

from bmojo_jax.train import files
from bmojo_jax.train import metrics as metrics_lib


MISSING_MATPLOTLIB = ("train.plots needs matplotlib, a dependency of bmojo_jax: pip install -e . "
                      "(or pip install 'matplotlib>=3.8')")


def _pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend; a ModuleNotFoundError saying what to install."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(MISSING_MATPLOTLIB, name="matplotlib") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_curves(workdir: str, out_path: str | None = None) -> str:
  """Writes loss (train, eval) and accuracy (train, eval) against step; returns the PNG path."""
  plt = _pyplot()

  records = metrics_lib.read_metrics(workdir)
  out_path = out_path or files.inside(workdir, "curves.png")   # never drawn through a planted link
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for split, style in (("train", "-"), ("eval", "o-"), ("val", "s--")):   # val: with a validation split
    steps, loss = metrics_lib.series(records, split, "loss")
    if steps:
      ax_loss.plot(steps, loss, style, label=split, markersize=3)
    steps, acc = metrics_lib.series(records, split, "accuracy")
    if steps:
      ax_acc.plot(steps, acc, style, label=split, markersize=3)
  ax_loss.set(xlabel="step", ylabel="loss (per supervised token)", yscale="log", title="loss")
  ax_acc.set(xlabel="step", ylabel="accuracy", ylim=(0.0, 1.0), title="accuracy (eval: per example)")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)
  return out_path


def maybe_plot(workdir: str) -> str | None:
  """`plot_curves` if the run has metrics (a run stopped before its first log has none); None otherwise."""
  if not os.path.exists(os.path.join(workdir, metrics_lib.METRICS_FILE)):
    return None
  return plot_curves(workdir)


if __name__ == "__main__":
  _USAGE = f"usage: python -m bmojo_jax.train.plots WORKDIR (a run directory holding {metrics_lib.METRICS_FILE})"
  if sys.argv[1:] in (["-h"], ["--help"]):
    print(f"{_USAGE}\n\nDraws WORKDIR/curves.png: the training and test curves of metrics.jsonl.")
    sys.exit(0)
  if len(sys.argv) != 2 or not os.path.exists(os.path.join(sys.argv[1], metrics_lib.METRICS_FILE)):
    sys.exit(_USAGE)
  try:
    print(plot_curves(sys.argv[1]))
  except ModuleNotFoundError as e:
    if e.name != "matplotlib":
      raise
    sys.exit(str(e))
