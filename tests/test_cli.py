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


def test_unknown_override_is_one_line_naming_the_closest_field(tmp_path):
  workdir = tmp_path / "run"
  out = cli("train", "--config", "configs/mqar.py", "--config.train.num_step=10", "--workdir", str(workdir))
  assert out.returncode != 0
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert lines == [lines[0]] and "no field 'num_step'; did you mean 'num_steps'?" in lines[0], out.stderr
  assert not workdir.exists()


def test_invalid_config_creates_no_workdir(tmp_path):
  workdir = tmp_path / "run"
  out = cli("train", "--config", "configs/mqar.py", "--config.train.batch_size=0", "--workdir", str(workdir))
  assert out.returncode != 0 and "train.batch_size=0 must be >= 1" in out.stderr
  assert not workdir.exists()
