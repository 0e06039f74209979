"""The console scripts' --help: exit 0, name the flags, and list a config file's fields on request. (Bad inputs to
them: tests/test_cli_inputs.py.)"""

import os
import subprocess
import sys

import pytest

from tests.test_cli_inputs import _flags_and_signals_restored
from bmojo_jax.train import cli as cli_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
  return subprocess.run([sys.executable, "-m", "bmojo_jax.train.cli", *args], cwd=REPO, capture_output=True, text=True,
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


def train_help_in_process(spec, monkeypatch, capsys) -> str:
  """What `bmojo-train -h --config SPEC` prints, run in this process (a subprocess spends its time importing
  jax and the config); exit 0 asserted."""
  monkeypatch.setattr(sys, "argv", ["bmojo-train", "-h", "--config", spec])
  with _flags_and_signals_restored(), pytest.raises(SystemExit) as e:
    cli_lib.train_main()
  out = capsys.readouterr()
  assert e.value.code == 0, out.err
  return out.out


def test_help_lists_the_fields_of_a_config(monkeypatch, capsys):
  out = train_help_in_process("configs/mqar.py:hybrid", monkeypatch, capsys)
  assert "--config.train.num_steps=1000" in out and "--config.model.family='hybrid'" in out


@pytest.mark.parametrize("spec", ["mqar:hybrid", "configs/mqar.py:hybrid", "mqar.py:hybrid"])
def test_the_projects_configs_load_by_name_from_any_directory(tmp_path, monkeypatch, capsys, spec):
  """Run from a folder that has no configs/: the bmojo_jax.configs package's file is used."""
  monkeypatch.chdir(tmp_path)
  assert not (tmp_path / "configs").exists()
  assert "--config.model.family='hybrid'" in train_help_in_process(spec, monkeypatch, capsys)


def one_line(stderr: str) -> str:
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert len(lines) == 1, stderr
  return lines[0]


def test_plots_without_matplotlib_says_what_to_install(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0, "accuracy": 0.5}\n')
  hide = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['bmojo_jax.train.plots', sys.argv[1]]; "
          "runpy.run_module('bmojo_jax.train.plots', run_name='__main__')")
  out = subprocess.run([sys.executable, "-c", hide, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 1
  assert "needs matplotlib" in one_line(out.stderr) and "pip install" in out.stderr
  assert not (tmp_path / "curves.png").exists()
  out = subprocess.run([sys.executable, "-m", "bmojo_jax.train.plots"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 1 and "usage: python -m bmojo_jax.train.plots WORKDIR" in one_line(out.stderr)
