"""The notebooks are stored executed, and run top to bottom in a fresh kernel (nbclient) with the same kinds of
outputs in each cell (text, figures); each notebook checks its own claims with asserts, and CHECKS adds a few
that the test keeps even if a notebook changes."""

import copy
import os
import pathlib

import nbclient   # the notebooks extra (in dev): pip install -e .[notebooks]
import nbformat
import pytest

REPO = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CHECKS = {   # code appended to a notebook's copy before it runs
    "explore_memory.ipynb": ("fifo, score = occupancies.values()\n"
                             "assert (fifo != score).any() and fifo.sum() > 0"),
    "memory_attention.ipynb": ("assert np.allclose(probs.sum(-1), 1, atol=1e-5)\n"
                               "assert reads['eidetic'][cfg.chunk:].min() > 0"),
    "selective_scan.ipynb": "assert np.allclose(h_steps[-1], h_parallel, atol=1e-5)",
    "decoding.ipynb": "assert max_err < 1e-4 and len(set(sizes['bmojo'])) == 1",
}


def output_kinds(cell) -> list[str]:
  """What a code cell showed, by kind: 'stdout', 'image/png', 'text/plain' (results); errors fail the run, and
  stderr (a library's warning on some machine) is left out."""
  kinds = []
  for out in cell.get("outputs", []):
    if out["output_type"] == "stream":
      if out["name"] == "stdout":
        kinds.append("stdout")
    elif out["output_type"] in ("display_data", "execute_result"):
      kinds.append("image/png" if "image/png" in out["data"] else "text/plain")
    else:
      kinds.append(out["output_type"])
  return sorted(set(kinds))


def test_every_notebook_has_checks():
  assert NOTEBOOKS and {p.name for p in NOTEBOOKS} == set(CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_executed_and_runs(path):
  stored = nbformat.read(path, as_version=4)
  nbformat.validate(stored)
  code = [c for c in stored.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "store the notebook executed"
  assert any("image/png" in output_kinds(c) for c in code), "the notebook shows no figure"

  fresh = copy.deepcopy(stored)
  fresh.cells.append(nbformat.v4.new_code_cell(CHECKS[path.name]))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             MPLBACKEND="module://matplotlib_inline.backend_inline")   # figures inline, as in Jupyter
  client = nbclient.NotebookClient(fresh, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute(env=env)      # raises CellExecutionError, naming the cell, if any cell (or check) fails
  for before, after in zip(code, [c for c in fresh.cells if c.cell_type == "code"]):
    assert output_kinds(before) == output_kinds(after), (before.source[:200], output_kinds(after))
