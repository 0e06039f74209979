"""The console scripts' --help: exit 0, name the flags, and list a config file's fields on request. (Bad inputs to
them: tests/test_cli_inputs.py.)"""

import os
import runpy
import subprocess
import sys

import pytest

from tests.test_cli_inputs import _flags_and_signals_restored
from bmojo_jax.train import cli as cli_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
  return subprocess.run([sys.executable, "-m", "bmojo_jax.train.cli", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


MAINS = {"train": cli_lib.train_main, "eval": cli_lib.eval_main, "generate": cli_lib.generate_main}


def help_in_process(command, args, monkeypatch, capsys) -> str:
  """What `bmojo-<command> ARGS` prints when ARGS ask for help, run in this process (a subprocess spends its
  ~3 s importing jax and the config); exit 0 asserted."""
  monkeypatch.setattr(sys, "argv", [f"bmojo-{command}", *args])
  with _flags_and_signals_restored(), pytest.raises(SystemExit) as e:
    MAINS[command]()
  out = capsys.readouterr()
  assert e.value.code == 0, out.err
  return out.out


@pytest.mark.parametrize("command, needles", [
    ("train", ["usage: bmojo-train", "--config FILE[:PRESET]", "--config.<section>.<field>=VALUE", "--workdir"]),
    ("eval", ["usage: bmojo-eval", "--workdir", "--config"]),
    ("generate", ["usage: bmojo-generate", "--workdir", "--prompt", "--temperature", "token ids"]),
])
def test_help_exits_zero_and_names_the_flags(command, needles, monkeypatch, capsys):
  """train's through `python -m bmojo_jax.train.cli` in a subprocess (the module's command dispatch, exit
  status 0), eval's and generate's in this process (the same mains, one jax start-up fewer each)."""
  if command == "train":
    out = cli(command, "--help")
    assert out.returncode == 0, out.stderr
    text = out.stdout
  else:
    text = help_in_process(command, ["--help"], monkeypatch, capsys)
  for needle in needles:
    assert needle in text, (needle, text)


def train_help_in_process(spec, monkeypatch, capsys) -> str:
  """What `bmojo-train -h --config SPEC` prints, run in this process; exit 0 asserted."""
  return help_in_process("train", ["-h", "--config", spec], monkeypatch, capsys)


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


def test_plots_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0, "accuracy": 0.5}\n')
  hide = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['bmojo_jax.train.plots', sys.argv[1]]; "
          "runpy.run_module('bmojo_jax.train.plots', run_name='__main__')")
  out = subprocess.run([sys.executable, "-c", hide, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 1
  assert "needs matplotlib" in one_line(out.stderr) and "pip install" in out.stderr
  assert not (tmp_path / "curves.png").exists()
  # No WORKDIR: the module run as __main__ in this process (matplotlib hidden only needs a fresh one); exiting
  # with a string is Python's status 1 with that string on stderr.
  monkeypatch.setattr(sys, "argv", ["bmojo_jax.train.plots"])
  with pytest.raises(SystemExit) as e:
    runpy.run_module("bmojo_jax.train.plots", run_name="__main__")
  assert isinstance(e.value.code, str) and "usage: python -m bmojo_jax.train.plots WORKDIR" in one_line(e.value.code)
