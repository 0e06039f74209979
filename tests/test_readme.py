"""Every code block of README.md is tested.

- Python blocks run as written (on the CPU).
- Shell blocks: each command is checked against what it names here: the console scripts and their flags (as
  `--help` lists them), config files, presets, field overrides (parsed by ml_collections, the model fields
  validated by ModelConfig), pip extras, the corpus packages, modules and scripts.
- Then every shell command runs in a copy of the repository's files with the packages importable as
  `pip install -e .` makes them (and nothing else: `benchmarks/` is not), from the copy's root as a user
  types it: in chains, one test item each (a run directory's train, eval, generate and plots in README order;
  every other command alone; the corpus `prepare` before the chains that train on it), so that xdist spreads
  them over its workers (one test of all of them took ~750 s of a loaded 2-worker CI run by itself). Training
  commands get overrides appended that make them a few steps of a tiny model (the default run itself is
  measured in benchmarks/results/default_run_cpu.json); the `jupyter execute` line runs in
  tests/test_notebooks.py, once, as written, in the same kind of installed copy (so each notebook runs once in
  the suite); the `pip install`, `apt-get` and `bash scripts/test.sh` lines are not run (they would change this
  machine, and the last is the suite this test belongs to).
- The text block (the layout) names directories and files that exist.
"""

import functools
import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

from absl import flags
from ml_collections import config_flags
import pytest

from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train.data import corpus
from bmojo_jax.train.data import debian_texts

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
  out = subprocess.run([sys.executable, "-m", "bmojo_jax.train.cli", SCRIPTS[script], "--help"], cwd=REPO,
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
    elif command[:4] == ["apt-get", "install", "-y", "--no-install-recommends"]:
      needed = [p for s in corpus.DEFAULT_SOURCES for p in debian_texts.SOURCES[s].packages]
      assert args[3:] == needed, f"the README installs {args[3:]}, the default corpus reads {needed}"
    elif program == "jupyter":
      assert args[:2] == ["execute", "--inplace"] and args[2] == "notebooks/*.ipynb", command
    elif program in ("python", "python3") and args[0] == "-m":
      assert program == "python3", "python3, as in the first command (Debian has no `python`)"
      assert importlib.util.find_spec(args[1]) is not None, command
      if args[1] == "bmojo_jax.train.plots":
        assert args[2] in runs, f"python -m bmojo_jax.train.plots {args[2]}: no README command trains it"
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


# ------------------------------------------------------------------------------------------- running them
TINY = {   # appended to training commands, unless the command sets the field itself
    "configs/mqar.py": ["--config.model.d_model=16", "--config.model.n_layers=2", "--config.model.d_state=4",
                        "--config.data.seq_len=32",
                        "--config.data.num_kv_pairs=4", "--config.data.num_train=64", "--config.data.num_test=8",
                        "--config.train.num_steps=2", "--config.train.batch_size=4",
                        "--config.train.eval_batch_size=8"],
    "configs/lm.py": ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=2",
                      "--config.model.window=16", "--config.model.chunk_size=8", "--config.model.n_fading=2",
                      "--config.model.n_eidetic=4", "--config.model.eidetic_per_chunk=2",
                      "--config.model.d_state=4", "--config.model.compute.dtype=float32",
                      "--config.data.seq_len=32",
                      "--config.data.max_eval_sequences=4", "--config.train.num_steps=2",
                      "--config.train.batch_size=2", "--config.train.eval_batch_size=2"],
}
COMMON = ["--config.train.progress_bar=false"]


def installed_copy(root: pathlib.Path) -> dict:
  """The repository's files copied into `root/repo`, the packages `pip install -e .` installs linked into
  `root/site` (on PYTHONPATH) and the console scripts as shims in `root/bin` (on PATH): {cwd, env}."""
  repo = root / "repo"
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
  for name in files:
    if (REPO / name).is_file():
      (repo / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(REPO / name, repo / name)
  site, bin_dir = root / "site", root / "bin"
  site.mkdir()
  bin_dir.mkdir()
  toml = tomllib.loads((REPO / "pyproject.toml").read_text())
  (site / "bmojo_jax").mkdir()      # the installed layout: bmojo_jax/ holding its own files and the mapped folders
  for entry in (repo / "bmojo_jax").iterdir():
    (site / "bmojo_jax" / entry.name).symlink_to(entry)
  for package, folder in toml["tool"]["setuptools"]["package-dir"].items():
    (site / package.replace(".", "/")).symlink_to(repo / folder)
  for name, target in PYPROJECT["scripts"].items():
    module, func = target.split(":")
    shim = bin_dir / name
    shim.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.argv[0] = {name!r}\n"
                    f"sys.exit({func}())\n")
    shim.chmod(0o755)
  (bin_dir / "python3").symlink_to(sys.executable)
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(site),
         "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg", "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache")}
  return {"cwd": repo, "env": env}


def runnable(command: list[str]) -> list[str] | None:
  """The argv this test runs for a README command (None: checked above, not run)."""
  program, args = command[0], command[1:]
  if program in ("bash", "apt-get", "jupyter") or command[:4] == ["python3", "-m", "pip", "install"]:
    return None                   # jupyter: tests/test_notebooks.py runs it (every notebook, once in the suite)
  if program == "bmojo-train" and "--help" not in args:
    spec = args[args.index("--config") + 1].split(":")[0]
    given = {a.split("=")[0] for a in args}
    return command + [o for o in TINY[spec] + COMMON if o.split("=")[0] not in given]
  return command


def chain_key(command: list[str]) -> str:
  """The chain a runnable README command belongs to: the run directory it trains or reads (`--workdir W`,
  `train.plots W`); any other command is a chain of its own."""
  if command[0] in SCRIPTS and "--workdir" in command:
    return command[command.index("--workdir") + 1]
  if command[:3] == ["python3", "-m", "bmojo_jax.train.plots"]:
    return command[3]
  return shlex.join(command)


def chains() -> dict[str, list[list[str]]]:
  """The runnable README commands (README order kept within a chain) in independent chains, so that each chain is
  its own test item and xdist spreads them over its workers; a chain needs no other but the prepared corpus."""
  out = {}
  for command in shell_commands():
    if runnable(command) is not None:
      out.setdefault(chain_key(command), []).append(command)
  return out


PREPARE = ["python3", "-m", "bmojo_jax.train.data.corpus", "prepare"]
# What each chain leaves behind, beside every command's exit status 0.
ARTIFACTS = {"runs/default": ["runs/default/results.json", "runs/default/curves.png"],
             "runs/own": ["runs/own/results.json"], "runs/lm_cpu": ["runs/lm_cpu/lm_eval.json"],
             shlex.join(PREPARE): ["data/corpus/manifest.json"]}


def test_readme_chains_cover_every_command_once():
  runs = [command for command in shell_commands() if runnable(command) is not None]
  chained = [command for chain in chains().values() for command in chain]
  assert sorted(map(shlex.join, chained)) == sorted(map(shlex.join, runs))
  assert set(ARTIFACTS) <= set(chains()), set(ARTIFACTS) - set(chains())
  assert [chains()[key] for key in chains() if key == shlex.join(PREPARE)] == [[PREPARE]]
  for key, chain in chains().items():      # a chain reads only its own run directory (and the corpus)
    trains = [c for c in chain if c[0] == "bmojo-train" and "--help" not in c]
    assert len(trains) <= 1 and (not trains or chain[0] in trains), key
  generates = [c for chain in chains().values() for c in chain if c[0] == "bmojo-generate"]
  assert len(generates) == 2 and chain_key(generates[0]) == "runs/default", generates


def run_command(command: list[str], where: dict) -> subprocess.CompletedProcess:
  argv = runnable(command)
  out = subprocess.run(argv, capture_output=True, text=True, timeout=900, **where)
  if command[:3] == PREPARE[:3] and out.returncode != 0:
    # A machine without the Debian packages: the one-line message names them and the install line; the
    # rest of the LM commands then run on the stdlib stand-in corpus.
    assert "apt-get install -y --no-install-recommends" in out.stderr and len(out.stderr.splitlines()) == 1
    out = subprocess.run(argv + ["--sources", "stdlib"], capture_output=True, text=True, timeout=900, **where)
  assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
  return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
  """One installed copy per module (per xdist worker): the chains write different run directories, and they
  share its JAX compilation cache, which keeps every program (not only those compiling for a second or more): a
  command reads back what an earlier one compiled (eval and generate the programs their run's train built)."""
  where = installed_copy(tmp_path_factory.mktemp("readme"))
  where["env"].update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return where


@pytest.fixture(scope="module")
def prepared_corpus(installed) -> subprocess.CompletedProcess:
  """The README's `prepare`, run once in the copy for the chains that train on the corpus."""
  return run_command(PREPARE, installed)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("key", list(chains()), ids=lambda key: re.sub(r"\W+", "_", key).strip("_"))
def test_readme_shell_commands_run(key, installed, request):
  chain = chains()[key]
  if chain == [PREPARE] or any("--config.data.kind=corpus" in c for c in chain):
    request.getfixturevalue("prepared_corpus")
  ran = [(command, run_command(command, installed)) for command in chain if command != PREPARE]
  repo = installed["cwd"]
  for name in ARTIFACTS.get(key, []):
    assert (repo / name).exists(), f"{key}: no {name}"
  for command, out in ran:
    if command[0] == "bmojo-generate":
      assert "tokens/s" in out.stderr, (command, out.stderr[-2000:])
      if key == "runs/default":                        # MQAR, --max_new_tokens 1: one token id of the 256
        ids = out.stdout.split()
        assert len(ids) == 1 and 0 <= int(ids[0]) < 256, out.stdout
