"""The installed distribution claims one top-level name, bmojo_jax (issue 34): the repository's train/, configs/
and pallas_kernels/ install as bmojo_jax.train, bmojo_jax.configs and bmojo_jax.pallas_kernels, so a user's own
`train` or `configs` module is neither shadowed nor shadowing."""

import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest

import bmojo_jax

REPO = pathlib.Path(__file__).parent.parent
TOML = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = TOML["tool"]["setuptools"]
SIBLINGS = bmojo_jax._SIBLINGS   # pylint: disable=protected-access


def folder_packages() -> dict[str, pathlib.Path]:
  """{installed package name: its folder} for every folder with an __init__.py under bmojo_jax/ and the siblings."""
  out = {}
  for top, name in [(REPO / "bmojo_jax", "bmojo_jax")] + [(REPO / s, f"bmojo_jax.{s}") for s in SIBLINGS]:
    for init in sorted(top.rglob("__init__.py")):
      parts = init.parent.relative_to(top).parts
      out[".".join((name, *parts))] = init.parent
  return out


def test_packages_are_the_folders_under_one_name():
  assert SETUPTOOLS["package-dir"] == {f"bmojo_jax.{s}": s for s in SIBLINGS}
  assert isinstance(SETUPTOOLS["packages"], list)      # listed: setuptools' find cannot put them under bmojo_jax
  assert sorted(SETUPTOOLS["packages"]) == sorted(folder_packages())
  for script, target in TOML["project"]["scripts"].items():
    assert target.startswith("bmojo_jax."), (script, target)


def test_build_holds_only_bmojo_jax(tmp_path):
  """What setuptools builds from the pyproject, into tmp dirs (from a copy of the files it reads): the package
  tree a wheel holds (build_py) and the metadata beside it (egg_info: top_level.txt, entry_points.txt)."""
  src, lib, egg = tmp_path / "src", tmp_path / "lib", tmp_path / "egg"
  src.mkdir()
  egg.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy2(REPO / name, src / name)
  for top in ("bmojo_jax", *SIBLINGS):
    shutil.copytree(REPO / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  build = ("import sys, setuptools; "
           "setuptools.setup(script_args=['-q', 'egg_info', '--egg-base', sys.argv[1], 'build_py', '--build-lib', "
           "sys.argv[2]])")
  out = subprocess.run([sys.executable, "-c", build, str(egg), str(lib)], cwd=src, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": ""})
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(p.name for p in lib.iterdir()) == ["bmojo_jax"]
  built = {str(p.relative_to(lib)) for p in lib.rglob("*.py")}
  expected = {f"{name.replace('.', '/')}/{py.name}" for name, folder in folder_packages().items()
              for py in folder.glob("*.py")}
  assert built == expected, (sorted(built - expected)[:10], sorted(expected - built)[:10])
  assert {"bmojo_jax/train/cli.py", "bmojo_jax/configs/mqar.py", "bmojo_jax/pallas_kernels/sharding.py"} <= built
  info = next(egg.glob("*.egg-info"))
  assert (info / "top_level.txt").read_text().split() == ["bmojo_jax"]
  entry_points = (info / "entry_points.txt").read_text()
  targets = [line.split("=", 1)[1].strip() for line in entry_points.splitlines() if "=" in line]
  assert len(targets) == len(TOML["project"]["scripts"]) and all(t.startswith("bmojo_jax.") for t in targets)


@pytest.mark.parametrize("sibling", SIBLINGS)
def test_sibling_imported_by_its_bare_name_is_refused(sibling):
  """From the repository root, `import train` would load train/ a second time under another name: refused."""
  out = subprocess.run([sys.executable, "-c", f"import {sibling}"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert out.returncode != 0 and f"import it as bmojo_jax.{sibling}" in out.stderr, out.stderr[-2000:]


def test_source_checkout_resolves_the_namespaced_names(tmp_path):
  """PYTHONPATH=<repo root>, no install, from another directory: bmojo_jax.<sibling> is the repository's folder,
  and no module is loaded a second time under its bare name."""
  code = ("import sys, bmojo_jax.train.cli, bmojo_jax.configs.mqar, bmojo_jax.pallas_kernels.sharding as s\n"
          "print(bmojo_jax.train.cli.__file__, bmojo_jax.configs.mqar.__file__, s.__file__)\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('train', 'configs', 'pallas_kernels')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  files, bare = out.stdout.splitlines()
  assert files.split() == [str(REPO / "train/cli.py"), str(REPO / "configs/mqar.py"),
                           str(REPO / "pallas_kernels/sharding.py")]
  assert bare == "[]"
