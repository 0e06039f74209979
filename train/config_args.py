"""The commands' --config arguments: FILE[:PRESET] found here or among the installed configs, loaded as
ml_collections' `--config` loads it, its fields listed for --help, and every `--config.<field>=VALUE` override
checked against them before absl parses anything (one line naming the closest fields)."""

import difflib
import importlib.util
import os
import sys


def config_arg(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def resolve_config_spec(spec: str) -> str:
  """FILE[:PRESET] as given where FILE is a file here; else, for a name of the project's own configs (`mqar`,
  `mqar.py` or `configs/mqar.py`; likewise `lm`), the `bmojo_jax.configs` package's file, so `--config mqar:bmojo`
  works from any directory. Anything else is returned unchanged (and refused by `load_config`)."""
  path, sep, preset = spec.partition(":")
  if os.path.isfile(path) or os.path.dirname(path) not in ("", "configs"):
    return spec
  from bmojo_jax import configs  # pylint: disable=g-import-not-at-top
  name = os.path.basename(path) if path.endswith(".py") else os.path.basename(path) + ".py"
  installed = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), name)
  return installed + sep + preset if os.path.isfile(installed) else spec


def resolve_config_args(argv: list[str]) -> list[str]:
  """argv with the value of `--config X` / `--config=X` passed through `resolve_config_spec` (overrides
  `--config.<field>=...` untouched)."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + resolve_config_spec(arg.split("=", 1)[1])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config_spec(out[i + 1])
  return out


def load_config(spec: str):
  """The ConfigDict of `spec` = FILE[:PRESET], as `--config` loads it (FileNotFoundError if there is no FILE;
  a bad preset raises whatever the file's get_config raises, a ValueError for ours)."""
  path, _, preset = resolve_config_spec(spec).partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such config file {path!r}")
  module_spec = importlib.util.spec_from_file_location("_bmojo_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def _leaves(d: dict, prefix: str = ""):
  """(dotted path, value) of every leaf field of a nested dict."""
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def config_fields(spec: str) -> list[str]:
  """`--config.<path>=<value>` for every field of the config file `spec` (FILE[:PRESET])."""
  return [f"  --config.{path}={value!r}" for path, value in _leaves(load_config(spec).to_dict())]


def check_config_args(argv: list[str], command: str) -> None:
  """Exits with one line if --config names no loadable file or preset, or a `--config.<field>` override names
  no field of it (with the closest field names, by difflib; a compute field named flat under model, as before
  `ModelConfig.compute`, with its new key). Values are left to ml_collections' parser."""
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  spec = config_arg(argv)
  if spec is None:
    if overrides:
      sys.exit(f"{command}: --config.{overrides[0]} overrides a config field, but no --config FILE is given")
    return
  try:
    config = load_config(spec)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"{command}: --config {spec}: {e}")
  from bmojo_jax.config import COMPUTE_FIELDS  # pylint: disable=g-import-not-at-top
  fields = [path for path, _ in _leaves(config.to_dict())]
  for name in overrides:
    section, _, field = name.partition(".")
    if section == "model" and field in COMPUTE_FIELDS and f"model.compute.{field}" in fields:
      sys.exit(f"{command}: --config.{name} is now --config.model.compute.{field} (how the model computes: "
               "model.compute, a ComputeConfig)")
    if name not in fields:
      section, _, leaf = name.rpartition(".")          # e.g. data.seed: every *seed* field of data first
      named = [f for f in fields if f.rpartition(".")[0] == section and leaf and leaf in f.rpartition(".")[2]]
      close = (named + [f for f in difflib.get_close_matches(name, fields, n=3, cutoff=0.6) if f not in named])[:4]
      hint = (f"closest: {', '.join(close)}" if close else f"`{command} --help --config {spec}` lists them")
      sys.exit(f"{command}: --config.{name}: {spec} has no field {name!r}; {hint}")
