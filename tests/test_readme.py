"""Every code block of README.md is tested.

- Python blocks run as written (on the CPU).
- Shell blocks: each command is checked against what it names here, without running it: the console scripts
  and their flags (as `--help` lists them), config files, presets, field overrides (parsed by ml_collections,
  the model fields validated by ModelConfig), pip extras, modules and scripts. The runs themselves are tested
  elsewhere: train / eval / generate end to end in tests/test_train_loop.py (test_cli_train_eval,
  test_generate_from_run), `bash scripts/test.sh` is what CI runs, and the first command is the default run
  measured in benchmarks/results/default_run_cpu.json.
- The text block (the layout) names directories and files that exist.
"""

import functools
import importlib.util
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

from absl import flags
from ml_collections import config_flags
import pytest

from train import setup as setup_lib

REPO = pathlib.Path(__file__).parent.parent
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.S | re.M)
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SCRIPTS = {"bmojo-train": "train", "bmojo-eval": "eval", "bmojo-generate": "generate"}


def blocks(language: str) -> list[str]:
  return [body for lang, body in BLOCKS if lang == language]


def shell_commands() -> list[list[str]]:
  """Every command of the bash blocks, as argv lists (comments dropped, `a && b` split)."""
  commands = []
  for block in blocks("bash"):
    for line in block.splitlines():
      words = shlex.split(line, comments=True)
      while words:
        cut = words.index("&&") if "&&" in words else len(words)
        commands.append(words[:cut])
        words = words[cut + 1:]
  return commands


def test_every_block_is_python_bash_or_text():
  assert {lang for lang, _ in BLOCKS} <= {"python", "bash", ""}, [lang for lang, _ in BLOCKS]
  assert blocks("python") and blocks("bash")


def test_readme_python_blocks_run():
  for i, block in enumerate(blocks("python")):
    exec(compile(block, f"README.md python block {i}", "exec"), {})


@functools.cache
def help_text(script: str) -> str:
  out = subprocess.run([sys.executable, "-m", "train.cli", SCRIPTS[script], "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  return out.stdout


def parse_config(args: list[str]):
  """The config `--config FILE[:PRESET] --config.<field>=VALUE ...` builds, parsed as the CLI parses it."""
  argv = ["bmojo", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def check_console_script(script: str, args: list[str], runs: dict) -> None:
  assert script in PYPROJECT["scripts"]
  names = [a.split("=", 1)[0] for a in args if a.startswith("--")]
  for name in names:
    if name not in ("--help", "--config") and not name.startswith("--config."):
      assert f"  {name}:" in help_text(script), f"{script} has no flag {name}"
  value = lambda flag: args[args.index(flag) + 1] if flag in args else None
  spec = value("--config") or next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
  if spec:
    config_args = [f"--config={spec}", *(a for a in args if a.startswith("--config."))]
    config = parse_config(config_args)
    setup_lib.model_config(config)                     # the model fields make a valid ModelConfig
    if value("--workdir"):
      runs[value("--workdir")] = config
  if script == "bmojo-train":
    assert "--help" in names or (spec and value("--workdir")), args
  if script in ("bmojo-eval", "bmojo-generate"):
    workdir = value("--workdir")
    assert workdir in runs, f"{script} --workdir {workdir}: no README command trains it"
    prompt = value("--prompt")
    if prompt and runs[workdir].data.kind == "mqar":  # MQAR runs take token ids below the vocabulary size
      assert all(0 <= int(t) < runs[workdir].model.vocab_size for t in prompt.split()), prompt


def test_readme_shell_commands_name_what_exists():
  runs = {}
  for command in shell_commands():
    program, args = command[0], command[1:]
    if program in SCRIPTS:
      check_console_script(program, args, runs)
    elif command[:4] == ["python3", "-m", "pip", "install"]:
      assert args[3] == "-e", command
      extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", args[4])
      assert extras, command
      for extra in filter(None, (extras.group(1) or "").split(",")):
        assert extra in PYPROJECT["optional-dependencies"], extra
    elif program == "bash":
      assert (REPO / args[0]).is_file(), command
    elif program in ("python", "python3") and args[0] == "-m":
      assert importlib.util.find_spec(args[1]) is not None, command
      if args[1] == "train.plots":
        assert args[2] in runs, f"python -m train.plots {args[2]}: no README command trains it"
    else:
      pytest.fail(f"README command {shlex.join(command)!r} has no check here; add one")


def test_readme_layout_names_what_exists():
  layout = blocks("")
  assert len(layout) == 1
  for line in layout[0].splitlines():
    folder = line.split()[0] if line and not line.startswith(" ") else None
    if folder:
      assert (REPO / folder).is_dir(), folder
      current = folder
    for name in re.findall(r"\b([\w/]+\.(?:py|md|ipynb))\b", line):
      assert (REPO / current / name).exists() or (REPO / name).exists(), f"{current}{name}"
