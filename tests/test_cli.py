"""The console scripts' --help: exit 0, name the flags, and list a config file's fields on request. (Bad inputs to
them: tests/test_cli_inputs.py.)"""

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
