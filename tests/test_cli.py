"""The console scripts' --help: exit 0, name the flags, and list a config file's fields on request."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
  return subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.parametrize("command, needles", [
    ("train", ["usage: bmojo-train", "--config FILE[:PRESET]", "--config.<section>.<field>=VALUE", "--workdir"]),
    ("eval", ["usage: bmojo-eval", "--workdir", "--config"]),
    ("generate", ["usage: bmojo-generate", "--workdir", "--prompt", "--temperature", "token ids"]),
])
def test_help_exits_zero_and_names_the_flags(command, needles):
  out = cli(command, "--help")
  assert out.returncode == 0, out.stderr
  for needle in needles:
    assert needle in out.stdout, (needle, out.stdout)


def test_help_lists_the_fields_of_a_config():
  out = cli("train", "-h", "--config", "configs/mqar.py:hybrid")
  assert out.returncode == 0, out.stderr
  assert "--config.train.num_steps=1000" in out.stdout and "--config.model.family='hybrid'" in out.stdout


@pytest.mark.parametrize("spec", ["mqar:hybrid", "configs/mqar.py:hybrid", "mqar.py:hybrid"])
def test_the_projects_configs_load_by_name_from_any_directory(tmp_path, spec):
  """Run from a folder that has no configs/: the installed configs package's file is used."""
  out = subprocess.run([sys.executable, "-m", "train.cli", "train", "-h", "--config", spec], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
  assert out.returncode == 0, out.stderr
  assert "--config.model.family='hybrid'" in out.stdout


def one_line(stderr: str) -> str:
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert len(lines) == 1, stderr
  return lines[0]


@pytest.mark.parametrize("override, needle", [
    ("--config.train.num_step=10", "has no field 'train.num_step'; closest: train.num_steps"),
    ("--config.trian.num_steps=10", "has no field 'trian.num_steps'; closest: train.num_steps"),
    ("--config.model.d_modle=32", "has no field 'model.d_modle'; closest: model.d_model"),
    ("--config.nothing_like_it=1", "`bmojo-train --help --config configs/mqar.py` lists them"),
])
def test_unknown_override_is_one_line_naming_the_closest_fields(tmp_path, override, needle):
  workdir = tmp_path / "run"
  out = cli("train", "--config", "configs/mqar.py", override, "--workdir", str(workdir))
  assert out.returncode != 0
  line = one_line(out.stderr)
  assert line.startswith("bmojo-train: " + override.split("=")[0]) and needle in line, line
  assert not workdir.exists()


@pytest.mark.parametrize("spec, needle", [
    ("configs/mqar.py:hybird", "preset 'hybird' is unknown; choose one of"),
    ("configs/nope.py", "no such config file 'configs/nope.py'"),
])
def test_bad_config_file_or_preset_is_one_line(tmp_path, spec, needle):
  out = cli("train", "--config", spec, "--workdir", str(tmp_path / "run"))
  assert out.returncode != 0 and needle in one_line(out.stderr)
  assert not (tmp_path / "run").exists()


def test_invalid_config_creates_no_workdir(tmp_path):
  workdir = tmp_path / "run"
  out = cli("train", "--config", "configs/mqar.py", "--config.train.batch_size=0", "--workdir", str(workdir))
  assert out.returncode != 0 and "train.batch_size=0 must be >= 1" in out.stderr
  assert not workdir.exists()


def test_plots_without_matplotlib_says_what_to_install(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0, "accuracy": 0.5}\n')
  hide = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['train.plots', sys.argv[1]]; "
          "runpy.run_module('train.plots', run_name='__main__')")
  out = subprocess.run([sys.executable, "-c", hide, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 1
  assert "needs matplotlib" in one_line(out.stderr) and "pip install" in out.stderr
  assert not (tmp_path / "curves.png").exists()
  out = subprocess.run([sys.executable, "-m", "train.plots"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 1 and "usage: python -m train.plots WORKDIR" in one_line(out.stderr)
