"""Console scripts: thin absl / ml_collections wrappers over `train.trainer`, `train.runs` and `bmojo_jax.inference`.

    bmojo-train --config configs/mqar.py[:<preset>] --workdir DIR [--config.train.num_steps=...]
    bmojo-eval --workdir DIR                      # evaluates the latest checkpoint, writes DIR/eval.json
    bmojo-generate --workdir DIR --prompt "..." [--max_new_tokens N --temperature T --top_k K --top_p P --seed S
                   --prefill_chunk C --stream --stream_block N --kernel_layout in_out|out_in]

Exit status: 0 when training ends (num_steps or the target accuracy), 75 (EX_TEMPFAIL) when SIGTERM or SIGINT
stopped it after a checkpoint was saved (rerun the same command to resume), 1 on an error, and 1 when the run
stopped as "collapsed": its accuracy reached the target but its test loss is at ln V (`train.steps.collapsed`),
so it is no success. A run that ends collapsed otherwise (e.g. too few steps to learn) exits 0 and says so.

Multi-host: when JAX_COORDINATOR_ADDRESS is set (with JAX_NUM_PROCESSES and JAX_PROCESS_ID), or on a
cluster jax detects by itself with BMOJO_DISTRIBUTED=1, `jax.distributed.initialize()` runs first.
"""

import contextlib
import functools
import json
import os
import signal
import sys
import textwrap
import warnings

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

from bmojo_jax.train import config_args

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped by SIGTERM / SIGINT after saving; rerun to resume
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config, results.")
_DEBUG = flags.DEFINE_boolean("debug", False, "Show the traceback of an error instead of its one- or two-line "
                              "summary.")


@contextlib.contextmanager
def _one_line_errors(command: str):
  """Every error as `command: <cause and next step>` in one or two lines, exit status 1 (the traceback with
  --debug). The refusals of this project carry their own next step; anything else is summarized as unexpected."""
  from bmojo_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from bmojo_jax.train import files  # pylint: disable=g-import-not-at-top
  from bmojo_jax.train import workdir_lock  # pylint: disable=g-import-not-at-top
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if _DEBUG.value or isinstance(e, app.UsageError):
      raise
    if isinstance(e, files.WriteError) and "\n" not in str(e):   # eval's files: no checkpoints to speak of
      sys.exit(f"{command}: {e}\n{e.fix} and rerun the same command.")
    if isinstance(e, (ckpt_lib.CheckpointError, files.WriteError, workdir_lock.WorkdirBusyError)):
      sys.exit(f"{command}: {e}")
    if isinstance(e, (FileNotFoundError, ValueError)):
      sys.exit(f"{command}: {type(e).__name__}: {e}")
    if isinstance(e, OSError):
      cause = files.failure_cause(e)
      sys.exit(f"{command}: {e.filename or 'a file'}: {cause}.\n{files.FIXES.get(cause, 'Fix it')} and rerun "
               "the same command (--debug shows the traceback).")
    sys.exit(f"{command}: unexpected {files.brief(e)}\nRerun with --debug for the traceback, and report it if "
             "the cause is not yours.")


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
  signums = []    # a SIGTERM / SIGINT while jax is imported: the trainer's StopRequest acts on it at once
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda signum, frame: signums.append(signum))
  _quiet_logs()
  with _one_line_errors("bmojo-train"):
    from bmojo_jax.train import trainer  # pylint: disable=g-import-not-at-top
    stop = trainer.StopRequest()
    for s in (signal.SIGTERM, signal.SIGINT):
      signal.signal(s, stop)
    stop.signum = stop.signum or (signums[0] if signums else None)
    _maybe_initialize_distributed()
    config = flags.FLAGS.config
    if config is None:
      raise app.UsageError("--config is required, e.g. --config configs/mqar.py:bmojo")
    try:
      results = trainer.train(config, _WORKDIR.value, stop=stop)
    except trainer.NonFiniteLossError as e:
      sys.exit(f"bmojo-train: {e}")
    except trainer.LateStop as e:
      print(f"bmojo-train: {e} Exiting with status {EXIT_STOPPED}.", file=sys.stderr)
      sys.exit(EXIT_STOPPED)
    except ModuleNotFoundError as e:   # the plot, drawn after results.json is written
      if e.name != "matplotlib":
        raise
      sys.exit(f"bmojo-train: {e}; results.json is written (--config.train.plot=false skips the plot)")
  print(json.dumps(results, indent=2))
  if "test_accuracy" in results:
    print(f"test accuracy {results['test_accuracy']:.4f} at step {results['test_step']} "
          f"({results['wall_s']:.0f} s); results in {os.path.join(_WORKDIR.value, 'results.json')}")
  if results.get("stopped_by") == "collapsed":
    sys.exit(f"bmojo-train: collapsed at step {results['step']}: test loss {results['test_loss']:.4f} is at ln V "
             "(uniform logits), so its accuracy is no success; lower optim.learning_rate (results.json has "
             "\"collapsed\": true).")
  if results.get("stopped_by") in ("SIGTERM", "SIGINT"):
    print(f"bmojo-train: stopped by {results['stopped_by']} at step {results['step']}; exiting with status "
          f"{EXIT_STOPPED} so a scheduler can requeue; rerun the same command to resume.",
          file=sys.stderr)
    sys.exit(EXIT_STOPPED)


def _eval(argv):
  del argv
  _quiet_logs()
  from bmojo_jax.train import files, runs  # pylint: disable=g-import-not-at-top
  _maybe_initialize_distributed()
  f = flags.FLAGS
  if f.lm_model and not (f.lm_lengths or f.niah):
    sys.exit("bmojo-eval: --lm_model changes the model of --lm_lengths / --niah only; add one of them (the "
             "test-set evaluation uses the trained model as it is).")
  for name in ("lm_text", "lm_stream"):
    if f[name].present and not (f.lm_lengths or f.niah):
      sys.exit(f"bmojo-eval: --{name} names the documents of --lm_lengths / --niah only; add one of them (the "
               "test-set evaluation reads the run's own test set).")
    if f[name].present and not f[name].value.strip():
      sys.exit(f"bmojo-eval: --{name} is empty; name a text file or folder (--lm_text) or a token stream folder "
               "(--lm_stream).")
  if f.lm_text and f.lm_stream:
    sys.exit("bmojo-eval: --lm_text and --lm_stream both name the documents to evaluate on; give one.")
  if f.lm_lengths or f.niah:   # perplexity against context / NIAH (docs/lm.md) instead of the test-set pass
    from bmojo_jax.train import lm_eval  # pylint: disable=g-import-not-at-top
    with _one_line_errors("bmojo-eval"):
      factors, niah_factors = (lm_eval.parse_multiples(n, f[n].value) for n in ("lm_lengths", "niah_lengths"))
      record = lm_eval.evaluate_lm_run(
          _WORKDIR.value, config=f.config, factors=factors, niah=f.niah, niah_factors=niah_factors,
          niah_samples=f.niah_samples, gen_tokens=f.niah_gen_tokens, max_windows=f.lm_windows or None,
          overrides=lm_eval.parse_overrides(f.lm_model), text=f.lm_text or None, stream=f.lm_stream or None)
    with _one_line_errors("bmojo-eval"):   # a figure is never drawn through a planted link
      figures = [files.inside(_WORKDIR.value, name) for name in ("lm_ppl.png", "lm_niah.png")]
    try:
      plots = lm_eval.plot_records([record], *figures)
    except ImportError as e:
      plots = []
      print(f"bmojo-eval: no plots: {e}", file=sys.stderr)
    print(json.dumps({k: v for k, v in record.items() if k != "heldout_documents"}, indent=2))
    print(f"written: {', '.join([os.path.join(_WORKDIR.value, lm_eval.RESULT_FILE), *plots])}")
    return
  with _one_line_errors("bmojo-eval"), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", runs.NonFiniteResultWarning)
    result = runs.evaluate_run(_WORKDIR.value, flags.FLAGS.config)
  print(json.dumps(result, indent=2))
  for w in caught:
    print(f"bmojo-eval: warning: {w.message}", file=sys.stderr)
  if result.get("nonfinite"):   # strict JSON has no NaN: eval.json holds null there
    sys.exit(1)


def _generate(argv):
  del argv
  _quiet_logs()
  from bmojo_jax.train import generate as gen_lib  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.stream_block < 1:
    sys.exit(f"bmojo-generate: --stream_block={f.stream_block} must be >= 1")
  with _one_line_errors("bmojo-generate"):
    text = gen_lib.generate_from_run(
        _WORKDIR.value, f.prompt, max_new_tokens=f.max_new_tokens, temperature=f.temperature,
        top_k=f.top_k, top_p=f.top_p, seed=f.seed, prefill_chunk=f.prefill_chunk,
        stream_to=sys.stdout if f.stream else None, stream_block=f.stream_block, kernel_layout=f.kernel_layout)
  print("" if f.stream else text)          # streamed: the text is out already; end its line


_CONFIG_HELP = """  --config FILE[:PRESET]: a config file (configs/mqar.py, configs/lm.py, or from any directory the
    installed ones by name: mqar, lm), optionally with a preset
    (transformer, mamba, hybrid, bmojo_f, bmojo; configs/lm.py also takes bmojo,cpu and so on for a CPU-sized
    run), e.g. --config configs/mqar.py:hybrid
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


def _parse_flags(argv, command: str):
  """absl's flag parsing, after `config_args.check_config_args`; an override ml_collections still refuses (a value the
  field cannot take) is reported in one line instead of a traceback."""
  config_args.check_config_args(argv[1:], command)
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = " ".join(str(e).replace("\\'", "'").replace("\\n", " ").strip("'\"").split())
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"{command}: bad config override among {', '.join(overrides)}: {message}")


def _run(main, command: str, with_config: bool) -> None:
  """app.run(main), except that -h / --help prints this command's usage and flags and exits 0."""
  sys.argv[1:] = config_args.resolve_config_args(sys.argv[1:])
  argv = sys.argv[1:]
  if not any(a in ("-h", "--help", "-help", "--helpshort") for a in argv):
    app.run(main, flags_parser=functools.partial(_parse_flags, command=command))
    return
  print(f"usage: {USAGE[command]}\n\nflags:")
  if with_config:
    print(_CONFIG_HELP)
  for flag in flags.FLAGS.get_flags_for_module(__name__):   # this command's own flags, in definition order
    if flag.name != "config":
      default = "" if flag.default in (None, "") else f" (default {flag.default})"
      print(textwrap.fill(f"  --{flag.name}: {flag.help}{default}", width=110, subsequent_indent="    ",
                          break_on_hyphens=False))
  spec = config_args.config_arg(argv)
  if with_config and spec:
    try:
      fields = config_args.config_fields(spec)
    except (FileNotFoundError, ValueError) as e:
      sys.exit(f"{command}: --config {spec}: {e}")
    print(f"\nfields of {spec}:")
    print("\n".join(fields))
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
  flags.DEFINE_string("lm_lengths", "", "Text runs: perplexity at these multiples of the training length, e.g. "
                      "1,2,4,8,16, on the held-out documents; with it or --niah, DIR/lm_eval.json, lm_ppl.png and "
                      "lm_niah.png are written instead of eval.json (docs/lm.md).")
  flags.DEFINE_boolean("niah", False, "Text runs: RULER's NIAH tasks at --niah_lengths (greedy decoding).")
  flags.DEFINE_string("niah_lengths", "1,2,4", "NIAH lengths as multiples of the training length.")
  flags.DEFINE_integer("niah_samples", 50, "NIAH samples per task and length.")
  flags.DEFINE_integer("niah_gen_tokens", 128, "Tokens generated per NIAH sample (part of its length).")
  flags.DEFINE_string("lm_text", "", "Evaluate --lm_lengths / --niah on these text files or folders "
                      "(comma-separated; read with the run's data.patterns, data.encoding, data.errors) instead "
                      "of the run's held-out documents.")
  flags.DEFINE_string("lm_stream", "", "Evaluate --lm_lengths / --niah on the documents of this token stream "
                      "folder (written by bmojo-prepare with the run's tokenizer) instead of the run's held-out "
                      "documents.")
  flags.DEFINE_integer("lm_windows", 64, "Held-out windows of the longest context scored (0: all).")
  flags.DEFINE_string("lm_model", "", "Model fields changed at evaluation, e.g. n_eidetic=256 (B'MOJO's store "
                      "grown) or compute.scan_impl=associative,compute.attn_impl=reference.")
  flags.mark_flags_as_required(["workdir"])
  _run(_eval, "bmojo-eval", with_config=True)


def generate_main():
  flags.DEFINE_string("prompt", "", "Prompt text (token ids separated by spaces for runs without a tokenizer).")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).")
  flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens.")
  flags.DEFINE_float("top_p", None, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("prefill_chunk", None, "Prefill a longer prompt in pieces of this many tokens (bounded "
                       "memory; default: the whole prompt in one parallel pass).")
  flags.DEFINE_bool("stream", False, "Print the continuation as it is produced (every --stream_block tokens) "
                    "instead of at the end; the same tokens.")
  flags.DEFINE_integer("stream_block", 16, "With --stream: decode steps on device between prints.")
  flags.DEFINE_enum("kernel_layout", None, ["in_out", "out_in"], "How the decoder stores the projection kernels "
                    "(default: the decoder's, out_in on a GPU, where a GEMV at one token reads it fastest).")
  flags.mark_flags_as_required(["workdir"])
  _run(_generate, "bmojo-generate", with_config=False)


if __name__ == "__main__":
  {"train": train_main, "eval": eval_main, "generate": generate_main}[sys.argv.pop(1)]()
