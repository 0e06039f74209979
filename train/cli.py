"""Console scripts: thin absl / ml_collections wrappers over `train.trainer` and `bmojo_jax.inference`.

    bmojo-train --config configs/mqar.py[:<preset>] --workdir DIR [--config.train.num_steps=...]
    bmojo-eval --workdir DIR                      # evaluates the latest checkpoint, writes DIR/eval.json
    bmojo-generate --workdir DIR --prompt "..." [--max_new_tokens N --temperature T --top_k K --top_p P --seed S]

Exit status: 0 when training ends (num_steps or the target accuracy), 75 (EX_TEMPFAIL) when SIGTERM or SIGINT
stopped it after a checkpoint was saved (rerun the same command to resume), 1 on an error.

Multi-host: when JAX_COORDINATOR_ADDRESS is set (with JAX_NUM_PROCESSES and JAX_PROCESS_ID), or on a
cluster jax detects by itself with BMOJO_DISTRIBUTED=1, `jax.distributed.initialize()` runs first.
"""

import importlib.util
import json
import os
import re
import sys

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped by SIGTERM / SIGINT after saving; rerun to resume
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config, results.")


def _maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when the environment describes a multi-process run."""
  import jax  # pylint: disable=g-import-not-at-top
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    jax.distributed.initialize(coordinator_address=address,
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("BMOJO_DISTRIBUTED") == "1":
    jax.distributed.initialize()  # auto-detected cluster (SLURM, TPU pods, ...)


def _quiet_logs() -> None:
  """Orbax logs every save at INFO; keep the console to the progress bar unless -v/--verbosity is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _train(argv):
  del argv
  _quiet_logs()
  from train import trainer  # pylint: disable=g-import-not-at-top
  _maybe_initialize_distributed()
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/mqar.py:bmojo")
  try:
    results = trainer.train(config, _WORKDIR.value)
  except trainer.NonFiniteLossError as e:
    sys.exit(f"bmojo-train: {e}")
  except (trainer.ckpt_lib.CheckpointError, FileNotFoundError, ValueError) as e:
    sys.exit(f"bmojo-train: {type(e).__name__}: {e}")
  print(json.dumps(results, indent=2))
  if "test_accuracy" in results:
    print(f"test accuracy {results['test_accuracy']:.4f} at step {results['test_step']} "
          f"({results['wall_s']:.0f} s); results in {os.path.join(_WORKDIR.value, 'results.json')}")
  if results.get("stopped_by") in ("SIGTERM", "SIGINT"):
    print(f"bmojo-train: stopped by {results['stopped_by']} at step {results['step']} (checkpoint saved); "
          f"exiting with status {EXIT_STOPPED} so a scheduler can requeue; rerun the same command to resume.",
          file=sys.stderr)
    sys.exit(EXIT_STOPPED)


def _eval(argv):
  del argv
  _quiet_logs()
  from train import trainer  # pylint: disable=g-import-not-at-top
  _maybe_initialize_distributed()
  try:
    result = trainer.evaluate_run(_WORKDIR.value, flags.FLAGS.config)
  except (trainer.ckpt_lib.CheckpointError, FileNotFoundError, ValueError) as e:
    sys.exit(f"bmojo-eval: {type(e).__name__}: {e}")
  print(json.dumps(result, indent=2))


def _generate(argv):
  del argv
  _quiet_logs()
  from train import generate as gen_lib  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    text = gen_lib.generate_from_run(
        _WORKDIR.value, f.prompt, max_new_tokens=f.max_new_tokens, temperature=f.temperature,
        top_k=f.top_k, top_p=f.top_p, seed=f.seed)
  except (gen_lib.ckpt_lib.CheckpointError, FileNotFoundError, ValueError) as e:
    sys.exit(f"bmojo-generate: {type(e).__name__}: {e}")
  print(text)


_CONFIG_HELP = """  --config FILE[:PRESET]: a config file (configs/mqar.py, configs/lm.py), optionally with a preset
    (transformer, mamba, hybrid, bmojo_f, bmojo), e.g. --config configs/mqar.py:hybrid
  --config.<section>.<field>=VALUE: overrides one field of the config, e.g. --config.train.num_steps=200;
    `--help --config FILE[:PRESET]` lists every field with its value"""

USAGE = {
    "bmojo-train": ("bmojo-train --config FILE[:PRESET] --workdir DIR [--config.<section>.<field>=VALUE ...]\n\n"
                    "Trains a model, or resumes the run in DIR from its latest checkpoint."),
    "bmojo-eval": ("bmojo-eval --workdir DIR [--config FILE[:PRESET]]\n\n"
                   "Evaluates the latest checkpoint of DIR (with its config.json unless --config is given) and "
                   "writes DIR/eval.json."),
    "bmojo-generate": ("bmojo-generate --workdir DIR --prompt TEXT [sampling flags]\n\n"
                       "Continues a prompt with the latest checkpoint of DIR. Runs without a tokenizer (MQAR) "
                       "take token ids separated by spaces, e.g. --prompt \"12 130 7\"."),
}


def _config_arg(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def config_fields(spec: str) -> list[str]:
  """`--config.<path>=<value>` for every field of the config file `spec` (FILE[:PRESET])."""
  path, _, preset = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_bmojo_config", path)
  if module_spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"--config {spec}: no such config file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(preset) if preset else module.get_config()

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from walk(v, f"{prefix}{k}.")
      else:
        yield f"  --config.{prefix}{k}={v!r}"
  return list(walk(config.to_dict(), ""))


def _parse_flags(argv):
  """absl's flag parsing, with a config override that names no field (or cannot take its value) reported in
  one line instead of a traceback: ml_collections raises those while the flags are parsed."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = " ".join(str(e).replace("\\'", "'").replace("\\n", " ").strip("'\"").split())
    guess = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', str(e))
    if guess:
      message = f"no field {guess.group(2)!r}; did you mean {guess.group(1)!r}?"
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"{os.path.basename(argv[0])}: bad config override among {', '.join(overrides)}: {message}")


def _run(main, command: str, with_config: bool) -> None:
  """app.run(main), except that -h / --help prints this command's usage and flags and exits 0."""
  argv = sys.argv[1:]
  if not any(a in ("-h", "--help", "-help", "--helpshort") for a in argv):
    app.run(main, flags_parser=_parse_flags)
    return
  print(f"usage: {USAGE[command]}\n\nflags:")
  if with_config:
    print(_CONFIG_HELP)
  for name in ["workdir", *_GENERATE_FLAGS] if not with_config else ["workdir"]:
    flag = flags.FLAGS[name]
    default = "" if flag.default in (None, "") else f" (default {flag.default})"
    print(f"  --{name}: {flag.help}{default}")
  spec = _config_arg(argv)
  if with_config and spec:
    print(f"\nfields of {spec}:")
    print("\n".join(config_fields(spec)))
  print("\nabsl's own flags: --helpfull")
  sys.exit(0)


def train_main():
  config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/mqar.py:bmojo.",
                                  lock_config=True)
  flags.mark_flags_as_required(["workdir", "config"])
  _run(_train, "bmojo-train", with_config=True)


def eval_main():
  config_flags.DEFINE_config_file("config", None, "Optional config overriding the workdir's config.json.",
                                  lock_config=True)
  flags.mark_flags_as_required(["workdir"])
  _run(_eval, "bmojo-eval", with_config=True)


_GENERATE_FLAGS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed")


def generate_main():
  flags.DEFINE_string("prompt", "", "Prompt text (token ids separated by spaces for runs without a tokenizer).")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).")
  flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens.")
  flags.DEFINE_float("top_p", None, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.mark_flags_as_required(["workdir"])
  _run(_generate, "bmojo-generate", with_config=False)


if __name__ == "__main__":
  {"train": train_main, "eval": eval_main, "generate": generate_main}[sys.argv.pop(1)]()
