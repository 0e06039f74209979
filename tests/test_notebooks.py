"""The notebooks are stored executed, and run top to bottom in a fresh kernel with the same kinds of outputs in
each cell (text, figures); each notebook checks its own claims with asserts, and CHECKS adds a few that the test
keeps even if a notebook changes.

They run once in the suite, by the README's own line (`jupyter execute --inplace notebooks/*.ipynb`, which
tests/test_readme.py checks and leaves to this module): in an installed copy of the repository (test_readme's
installed_copy: the packages as `pip install -e .` makes them, nothing else importable), each copied notebook with
its CHECKS cell appended; the executed copies are then compared with the stored notebooks."""

import glob
import os
import pathlib
import shlex
import subprocess
import sys

import nbformat   # the notebooks extra (in dev): pip install -e .[notebooks]
import pytest

from tests.test_readme import installed_copy, shell_commands

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


def run_readme_line(root: pathlib.Path) -> dict[str, nbformat.NotebookNode]:
  """The README's jupyter line run in an installed copy under `root` whose notebooks end with their CHECKS cell
  (each in a fresh kernel; a failing cell or check fails the command, naming the cell): {name: the executed
  copy}."""
  command, = [c for c in shell_commands() if c[0] == "jupyter"]
  assert command == ["jupyter", "execute", "--inplace", "notebooks/*.ipynb"], command
  where = installed_copy(root)
  copies = where["cwd"] / "notebooks"
  for path in NOTEBOOKS:
    fresh = nbformat.read(copies / path.name, as_version=4)
    fresh.cells.append(nbformat.v4.new_code_cell(CHECKS[path.name]))
    nbformat.write(fresh, copies / path.name)
  argv = [*command[:-1], *sorted(glob.glob(command[-1], root_dir=where["cwd"]))]   # the glob as bash expands it
  assert argv[3:] == [f"notebooks/{path.name}" for path in NOTEBOOKS], argv
  env = dict(where["env"], MPLBACKEND="module://matplotlib_inline.backend_inline")   # figures inline, as in Jupyter
  # The `jupyter` of this Python's environment (a venv run without activation, or one whose scripts are not on
  # PATH, would otherwise find another or none), so the kernel it starts imports what this suite installed.
  env["PATH"] = os.pathsep.join([str(root / "bin"), os.path.dirname(sys.executable), os.environ["PATH"]])
  out = subprocess.run(argv, capture_output=True, text=True, timeout=1500, cwd=where["cwd"], env=env)
  assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stdout[-2000:]}\n{out.stderr[-6000:]}"
  return {path.name: nbformat.read(copies / path.name, as_version=4) for path in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_executed(path):
  stored = nbformat.read(path, as_version=4)
  nbformat.validate(stored)
  code = [c for c in stored.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "store the notebook executed"
  assert any("image/png" in output_kinds(c) for c in code), "the notebook shows no figure"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_notebook_runs_as_stored(tmp_path):
  """One test item for all four (one run of the README's line, not one per xdist worker): every cell and check of
  each copy ran, and showed the same kinds of outputs as the stored notebook."""
  executed = run_readme_line(tmp_path)
  for path in NOTEBOOKS:
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    ran = [c for c in executed[path.name].cells if c.cell_type == "code"]
    assert len(ran) == len(code) + 1 and ran[-1].source == CHECKS[path.name], (path.name, "ran without CHECKS")
    assert [c.execution_count for c in ran] == list(range(1, len(ran) + 1)), (path.name, "a cell did not run")
    for before, after in zip(code, ran):
      assert before.source == after.source, path.name
      assert output_kinds(before) == output_kinds(after), (path.name, before.source[:200], output_kinds(after))
