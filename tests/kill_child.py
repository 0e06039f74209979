"""bmojo-train in a child process of `tests/test_faults_kill.py` that stops itself at one chosen point.

    python -m tests.kill_child CONFIG_FILE WORKDIR     (FAULT=<kind>:<step>, CACHE=<compilation cache folder>)

FAULT names where the process sends itself SIGKILL (or SIGTERM), at the first such point at or after <step>:
    save     inside a checkpoint save: just started, its arrays being written by Orbax in the background
    meta     inside a checkpoint save: in Orbax's thread, as the meta item is written (the arrays are done)
    metrics  in the middle of a metrics.jsonl line (half of it written and flushed)
    tb       between two TensorBoard scalars of a step (the first one flushed)
    eval     in the final evaluation
    results  after results.json's temporary file is written, before its rename
    term     SIGTERM after a logged step (the loop saves a checkpoint and stops: exit 75)
No FAULT: the run goes on to its end.
"""

import os
import signal
import sys

import jax

jax.config.update("jax_compilation_cache_dir", os.environ["CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import orbax.checkpoint as ocp  # noqa: E402

from bmojo_jax.train import checkpoint as ckpt_lib  # noqa: E402
from bmojo_jax.train import cli  # noqa: E402
from bmojo_jax.train import metrics as metrics_lib  # noqa: E402
from bmojo_jax.train import steps  # noqa: E402

KIND, _, AT = os.environ.get("FAULT", "").partition(":")
AT = int(AT or 0)


def die(signum=signal.SIGKILL):
  os.kill(os.getpid(), signum)


def after(owner, name, hook):
  """Replaces owner.name by a function that calls the original, then hook(*args) (same result)."""
  original = getattr(owner, name)

  def wrapped(*args, **kwargs):
    result = original(*args, **kwargs)
    hook(*args)
    return result
  setattr(owner, name, wrapped)


def before(owner, name, hook):
  original = getattr(owner, name)

  def wrapped(*args, **kwargs):
    hook(*args)
    return original(*args, **kwargs)
  setattr(owner, name, wrapped)


def torn_line(writer, step, metrics, split="train"):
  del metrics
  if split == "train" and step >= AT:
    writer._jsonl.write(f'{{"step": {step}, "split": "tr')   # pylint: disable=protected-access
    writer._jsonl.flush()                                      # pylint: disable=protected-access
    die()


def install() -> None:
  if KIND == "save":
    after(ckpt_lib.Checkpointer, "save", lambda self, step, *rest: step >= AT and die())
  elif KIND == "meta":
    original = ocp.JsonCheckpointHandler._save_fn   # pylint: disable=protected-access

    async def save_fn(self, x, directory):
      if isinstance(x, dict) and x.get("step", -1) >= AT and "checksums" in x:
        die()
      return await original(self, x, directory)
    ocp.JsonCheckpointHandler._save_fn = save_fn    # pylint: disable=protected-access
  elif KIND == "metrics":
    before(metrics_lib.MetricWriter, "write", torn_line)
  elif KIND == "tb":
    after(metrics_lib._EventFile, "add_scalar",    # pylint: disable=protected-access
          lambda self, tag, value, step: step >= AT and (self.flush(), die()))
  elif KIND == "eval":
    before(steps, "evaluate", lambda *args: die())
  elif KIND == "results":
    real = os.replace
    os.replace = lambda src, dst, *a, **k: die() if str(dst).endswith("results.json") else real(src, dst, *a, **k)
  elif KIND == "term":
    after(metrics_lib.MetricWriter, "write",
          lambda self, step, metrics, split="train": split == "train" and step >= AT and die(signal.SIGTERM))
  elif KIND:
    raise ValueError(f"FAULT={KIND!r} is unknown")


if __name__ == "__main__":
  install()
  sys.argv = ["bmojo-train", "--config", sys.argv[1], "--workdir", sys.argv[2]]
  cli.train_main()
