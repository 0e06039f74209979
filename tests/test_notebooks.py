"""The notebooks run top to bottom (code cells executed in order, plots to a non-interactive backend)."""

import json
import pathlib

import matplotlib
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  monkeypatch.setattr(plt, "show", lambda *a, **k: plt.close("all"))
  cells = json.loads(path.read_text())["cells"]
  namespace = {}
  for cell in cells:
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
  if path.name == "explore_memory.ipynb":   # the two store panels must show different stores
    fifo, score = namespace["occupancies"].values()
    assert (fifo != score).any() and fifo.sum() > 0
