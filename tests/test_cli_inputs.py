"""Bad inputs to the four console scripts (issue #31): each is refused in one or two lines naming the problem,
without a traceback and (bmojo-train) without creating the workdir, or accepted because it is valid.

The scripts run in this process (`run_script`): absl's flags of one call are removed before the next, and
bmojo-train's loop (`trainer._train`) is replaced by a recorder, so an accepted config is validated, its workdir
locked, and nothing is trained. Placeholders in the arguments: {w} a fresh workdir, {tmp} the module's folder
of inputs (`inputs`), {run} a run folder with config.json and an untrained checkpoint 0.
"""

import contextlib
import io
import re
import shlex
import signal
import sys

from absl import flags
import pytest

from tests.conftest import tiny_train_config
from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import cli
from bmojo_jax.train import runs
from bmojo_jax.train import setup as setup_lib
from bmojo_jax.train import trainer
from bmojo_jax.train.data import prepare
from bmojo_jax.train.workdir_lock import WorkdirLock

ACCEPTED = "accepted"
MAINS = {"train": cli.train_main, "eval": cli.eval_main, "generate": cli.generate_main,
         "prepare": lambda: prepare.main(sys.argv[1:])}
MQAR = "train --config configs/mqar.py --workdir {w} "
LM = "train --config configs/lm.py:bmojo,cpu --workdir {w} "

CASES = [   # (command line, a regex the one or two lines match, or ACCEPTED)
    # overrides with typos, wrong types, unknown names
    (MQAR + "--config.train.num_step=10", r"has no field 'train.num_step'; closest: train.num_steps"),
    (MQAR + "--config.trian.num_steps=10", r"has no field 'trian.num_steps'; closest: train.num_steps"),
    (MQAR + "--config.model.d_modle=32", r"has no field 'model.d_modle'; closest: model.d_model"),
    (MQAR + "--config.data.seed=1", r"has no field 'data.seed'; closest: .*data.train_seed"),
    (MQAR + "--config.nothing_like_it=1", r"`bmojo-train --help --config configs/mqar.py` lists them"),
    (MQAR + "--config.train.num_steps=abc", r"--config.train.num_steps=abc: invalid literal for int"),
    (MQAR + "--config.train.num_steps=1.5", r"--config.train.num_steps=1.5: invalid literal for int"),
    (MQAR + "--config.optim.learning_rate=fast", r"--config.optim.learning_rate=fast: could not convert"),
    (MQAR + "--config.model.family=gpt", r"family='gpt' is unknown; choose one of"),
    (MQAR + "--config.model.compute.dtype=float8", r"dtype='float8' is not a dtype"),
    (MQAR + "--config.model.compute.scan_impl=bogus", r"scan_impl='bogus' is unknown"),
    (MQAR + "--config.model.scan_impl=pallas", r"--config.model.scan_impl is now --config.model.compute.scan_impl"),
    (MQAR + "--config.model.remat=full", r"--config.model.remat is now --config.model.compute.remat"),
    (MQAR + "--config.mesh.logical_axis_rules.embed=gpu", r"logical_axis_rules.embed='gpu': give distinct mesh"),
    (MQAR + "--config.mesh.logical_axis_rules.heads=tensor,tensor", r"logical_axis_rules.heads='tensor,tensor'"),
    (MQAR + "--config.optim.decay=exp", r"optim.decay='exp' is unknown"),
    (MQAR + "--config.train.on_nonfinite=ignore", r"train.on_nonfinite='ignore' is unknown"),
    ("train --config configs/mqar.py:hybird --workdir {w}", r"preset 'hybird' is unknown; choose one of"),
    ("train --config configs/lm.py:bmojo,gpu9 --workdir {w}", r"preset suffix 'gpu9' is unknown"),
    ("train --config configs/nope.py --workdir {w}", r"no such config file 'configs/nope.py'"),
    ("train --config configs/mqar.py", r"--workdir must have a value"),
    ("train --workdir {w}", r"--config must have a value"),
    # negative, zero and impossible sizes
    (MQAR + "--config.train.batch_size=0", r"train.batch_size=0 must be >= 1"),
    (MQAR + "--config.train.num_steps=-1", r"train.num_steps=-1 must be >= 1"),
    (MQAR + "--config.train.checkpoint_every=0", r"train.checkpoint_every=0 must be >= 1"),
    (MQAR + "--config.train.grad_accum_steps=3", r"train.batch_size=64 is not divisible by train.grad_accum"),
    (MQAR + "--config.train.data_workers=-1", r"train.data_workers=-1 must be >= 0"),
    (MQAR + "--config.train.resume_from=-1", r"train.resume_from=-1 must be a checkpoint step"),
    (MQAR + "--config.train.target_accuracy=1.5", r"train.target_accuracy=1.5 must be in \[0, 1\]"),
    (MQAR + "--config.seed=-1", r"seed=-1 must be >= 0"),
    (MQAR + "--config.model.d_model=0", r"d_model=0 must be positive"),
    (MQAR + "--config.model.n_layers=-2", r"n_layers=-2 must be positive"),
    (MQAR + "--config.model.n_heads=3", r"n_heads=3 does not divide d_model=64"),
    (MQAR + "--config.model.window=0", r"window=0 must be positive"),
    (MQAR + "--config.model.eidetic_per_chunk=100", r"eidetic_per_chunk <= chunk_size; got .*=100"),
    (MQAR + "--config.data.seq_len=0", r"MQAR needs 4\*num_kv_pairs <= seq_len"),
    (MQAR + "--config.data.num_kv_pairs=0", r"num_kv_pairs must be >= 1"),
    (MQAR + "--config.data.vocab_size=4", r"MQAR needs vocab_size > seq_len"),
    (MQAR + "--config.data.num_test=0", r"data.num_test=0 must be >= 1"),
    (MQAR + "--config.data.num_test=10000000000", r"data.num_test=10000000000 is too many examples"),
    (MQAR + "--config.mesh.data=3", r"needs 3 devices, have 1"),
    (MQAR + "--config.optim.learning_rate=0", r"optim.learning_rate=0.0 must be positive"),
    (MQAR + "--config.optim.eps=-1e-8", r"optim.eps=-1e-08 must be >= 0"),
    (MQAR + "--config.optim.warmup_steps=-1", r"optim.warmup_steps=-1 must be >= 0"),
    (MQAR + "--config.optim.grad_clip_norm=-1", r"optim.grad_clip_norm=-1.0 must be >= 0"),
    (MQAR + "--config.optim.b1=1.5", r"optim.b1=1.5 must be in \[0, 1\)"),
    # data that does not fit the config, or is not there
    (MQAR + "--config.data.kind=text", r"data.kind='text' needs a text config .* use --config configs/lm.py"),
    (LM + "--config.data.kind=mqar", r"data.kind='mqar' needs an MQAR config .* use --config configs/mqar.py"),
    (LM + "--config.data.paths={tmp}/nope.txt", r"Text path does not exist: .*/nope.txt"),
    (LM + "--config.data.paths={tmp}/empty.txt", r"Text file is empty: .*/empty.txt"),
    (LM + "--config.data.paths={tmp}/latin1.txt", r"latin1.txt: not valid utf-8 at byte 3 .*--config.data.encoding"),
    (LM + "--config.data.paths={tmp}/empty_dir", r"No files matching .* under directory: .*/empty_dir"),
    (LM + "--config.data.tokenizer={tmp}/nope.model", r"data.tokenizer='.*/nope.model': not 'byte' and no such"),
    # workdirs
    ("train --config configs/mqar.py --workdir {tmp}/afile", r"The workdir .*/afile is a file, not a folder"),
    ("train --config configs/mqar.py --workdir {tmp}/busy", r".*/busy is in use by another run \(host "),
    # valid, though unusual: accepted (the last two with a warning, `test_valid_inputs_are_accepted`)
    (MQAR + "--config.train.batch_size=7", ACCEPTED),
    (MQAR + "--config.optim.warmup_steps=5000", ACCEPTED),
    (MQAR + "--config.model.window=64", ACCEPTED),
    (MQAR + "--config.model.compute.scan_impl=associative", ACCEPTED),
    (MQAR + "--config.mesh.logical_axis_rules.embed=", ACCEPTED),
    # bmojo-eval
    ("eval --workdir {tmp}/nope", r"No config.json in .*/nope: not a bmojo-train workdir"),
    ("eval --workdir {tmp}/empty_dir", r"No config.json in .*/empty_dir"),
    ("eval --workdir {tmp}/blank_config", r"config.json cannot be read: it is empty\. Rerun bmojo-train"),
    ("eval --workdir {tmp}/no_checkpoint", r"No checkpoint in .*/no_checkpoint/checkpoints: train first"),
    ("eval", r"--workdir must have a value"),
    ("eval --workdir {run} --lm_lengths=a,b", r"--lm_lengths='a,b': give multiples .* positive integers"),
    ("eval --workdir {run} --lm_lengths=0,2", r"--lm_lengths='0,2': give multiples"),
    ("eval --workdir {run} --lm_lengths=2", r"is not a text run \(no tokenizer\)"),
    ("eval --workdir {run} --lm_model=n_eidetic=8", r"--lm_model changes the model of --lm_lengths / --niah only"),
    ("eval --workdir {run} --lm_text={tmp}/latin1.txt", r"--lm_text names the documents of --lm_lengths / --niah"),
    ("eval --workdir {run} --lm_lengths=2 --lm_text={tmp}/a --lm_stream={tmp}/b", r"both name the documents"),
    ("eval --workdir {run} --niah --lm_text=", r"--lm_text is empty; name a text file or folder"),
    ("eval --workdir {run} --lm_lengths=2 --lm_model=attn_impl=reference",
     r"model override 'attn_impl' is now compute.attn_impl"),
    ("eval --workdir {run} --config configs/mqar.py:hybrid", r"was written for a different model; differing"),
    ("eval --workdir {run} --config configs/mqar.py:hybird", r"preset 'hybird' is unknown"),
    # bmojo-generate
    ("generate --workdir {tmp}/nope --prompt '1 2'", r"No config.json in .*/nope"),
    ("generate --prompt '1 2'", r"--workdir must have a value"),
    ("generate --workdir {run} --prompt hello", r"no tokenizer \(token-id task\): give the prompt as token ids"),
    ("generate --workdir {run} --prompt 999999", r"prompt token ids span \[999999, 999999\] but .* vocab_size is"),
    ("generate --workdir {run} --prompt ''", r"every prompt needs at least one token"),
    ("generate --workdir {run} --prompt '1 2' --max_new_tokens=0", r"max_new_tokens=0 must be >= 1"),
    ("generate --workdir {run} --prompt '1 2' --max_new_tokens=abc", r"--max_new_tokens=abc: invalid literal"),
    ("generate --workdir {run} --prompt '1 2' --temperature=-1", r"temperature=-1.0 must be >= 0"),
    ("generate --workdir {run} --prompt '1 2' --top_p=1.5", r"top_p=1.5 must be in \(0, 1\]"),
    ("generate --workdir {run} --prompt '1 2' --top_k=0", r"top_k=0 must be in 1..vocab_size"),
    ("generate --workdir {run} --prompt '1 2' --prefill_chunk=0", r"prefill_chunk=0 must be a positive int"),
    ("generate --workdir {run} --prompt '1 2' --stream --stream_block=0", r"--stream_block=0 must be >= 1"),
    ("generate --workdir {run} --prompt '1 2' --kernel_layout=rows", r"--kernel_layout=rows: value should be one of"),
    # bmojo-prepare
    ("prepare --no-progress --out {w} --text {tmp}/nope --workers 1", r"Text path does not exist: .*/nope"),
    ("prepare --no-progress --out {w} --text {tmp}/empty_dir --workers 1", r"No files matching .* under directory"),
    ("prepare --no-progress --out {w} --text {tmp}/blank_texts --workers 1", r"its 1 file\(s\) .* are all empty"),
    ("prepare --no-progress --out {w} --text {tmp}/latin1.txt --workers 1", r"latin1.txt: not valid utf-8 at byte 3"),
    ("prepare --no-progress --out {tmp}/afile --text {tmp}/latin1.txt", r"--out .*/afile is a file, not a folder"),
    ("prepare --no-progress --out {w} --text {tmp}/latin1.txt --workers 0", r"--workers 0: give at least 1"),
    ("prepare --no-progress --out {w} --text {tmp}/latin1.txt --docs-per-shard 0", r"docs_per_shard must be >= 1"),
    ("prepare --no-progress --out {w} --text {tmp}/latin1.txt --tokenizer {tmp}/nope.model", r"no such SentencePiece"),
    ("prepare --out {w}", r"name exactly one input: --text, --corpus, --array-record or --tfds"),
    ("prepare --text {tmp}/latin1.txt", r"the following arguments are required: --out"),
    ("prepare --out {w} --txt {tmp}/latin1.txt", r"unrecognized arguments: --txt"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """The folder of the placeholders: files and folders each case names, and {run}."""
  tmp = tmp_path_factory.mktemp("inputs")
  for name in ("empty_dir", "busy", "blank_texts", "blank_config", "no_checkpoint"):
    (tmp / name).mkdir()
  (tmp / "afile").write_text("")
  (tmp / "empty.txt").write_text("")
  (tmp / "blank_texts" / "a.txt").write_text("")
  (tmp / "blank_config" / "config.json").write_text("")
  (tmp / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
  config = tiny_train_config()
  setup = setup_lib.build(config)
  runs.write_run_files(str(tmp / "no_checkpoint"), config, setup.task.tokenizer)
  run = tmp / "run"
  run.mkdir()
  runs.write_run_files(str(run), config, setup.task.tokenizer)
  ckpt = ckpt_lib.Checkpointer(str(run / "checkpoints"), max_to_keep=1, async_save=False)
  ckpt.save(0, setup.init_state(), None, runs.checkpoint_meta(setup))
  ckpt.close()
  return tmp


@contextlib.contextmanager
def _flags_and_signals_restored():
  """The flags a console script defines (its own and config overrides) removed after it, absl's parsed state and
  the signal handlers it installs put back."""
  before = set(flags.FLAGS)
  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for name in set(flags.FLAGS) - before:
      if name == "config" or name.startswith("config.") or \
          flags.FLAGS.find_module_defining_flag(name) == cli.__name__:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    for s, h in handlers.items():
      signal.signal(s, h)


def run_script(command: str, monkeypatch) -> tuple[object, str, list]:
  """(exit code or message, what it wrote to stderr and the exit message, the Setups bmojo-train accepted)."""
  name, *args = shlex.split(command)
  accepted = []
  monkeypatch.setattr(trainer, "_train", lambda config, setup, *rest: accepted.append(setup) or {"step": 0})
  monkeypatch.setattr(sys, "argv", [f"bmojo-{name}", *args])
  err, code = io.StringIO(), 0
  with _flags_and_signals_restored(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
      MAINS[name]()
    except SystemExit as e:
      code = e.code
  said = err.getvalue() + (code if isinstance(code, str) else "")
  return code, said, accepted


@pytest.mark.parametrize("command, expected", CASES, ids=[c for c, _ in CASES])
def test_a_bad_input_is_refused_in_two_lines_naming_it(inputs, tmp_path, monkeypatch, command, expected):
  command = command.format(w=tmp_path / "w", tmp=inputs, run=inputs / "run")
  with WorkdirLock(str(inputs / "busy")) if "/busy" in command else contextlib.nullcontext():
    code, said, accepted = run_script(command, monkeypatch)
  lines = [l for l in said.splitlines() if l.strip()]
  if expected == ACCEPTED:
    assert code in (None, 0) and len(accepted) == 1 and not lines, said
    return
  assert code not in (None, 0) and not accepted, (code, said)
  assert 1 <= len(lines) <= 2 and "Traceback" not in said, said
  assert re.search(expected, said), said
  if command.startswith("train"):
    assert not (tmp_path / "w").exists()        # refused before the workdir is made


class _Writes(io.StringIO):
  """A stdout that keeps each write apart: what a streamed print sent, and when."""

  def __init__(self):
    super().__init__()
    self.writes = []

  def write(self, text):
    self.writes.append(text)
    return super().write(text)


def test_generate_stream_prints_the_same_tokens_as_they_come(inputs, monkeypatch):
  """bmojo-generate --stream writes the continuation in pieces (every --stream_block steps), flushed, and ends
  with the text that one call without --stream prints."""
  outputs = {}
  for extra in ("", "--stream --stream_block=2"):
    monkeypatch.setattr(sys, "argv", ["bmojo-generate", "--workdir", str(inputs / "run"), "--prompt", "3 130 5",
                                      "--max_new_tokens=7", *extra.split()])
    out = _Writes()
    with _flags_and_signals_restored(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(out):
      with pytest.raises(SystemExit) as done:              # absl's app.run exits, with None on success
        cli.generate_main()
    assert done.value.code in (None, 0)
    outputs[extra] = out
  whole, streamed = outputs[""], outputs["--stream --stream_block=2"]
  assert len(whole.getvalue().split()) == 7 and streamed.getvalue() == whole.getvalue()
  pieces = [w for w in streamed.writes if w.strip()]
  assert len(pieces) == 4 and [len(p.split()) for p in pieces] == [2, 2, 2, 1], streamed.writes


def test_there_are_at_least_46_bad_inputs():
  assert len([c for c, expected in CASES if expected != ACCEPTED]) >= 46


def test_valid_inputs_that_mislead_are_accepted_with_a_warning(tmp_path, monkeypatch):
  for override, warning in (("--config.optim.warmup_steps=5000", "optim.warmup_steps=5000 > train.num_steps"),
                            ("--config.model.window=64", "model.window=64 >= data.seq_len=64")):
    code, _, accepted = run_script((MQAR + override).format(w=tmp_path / override[9:]), monkeypatch)
    assert code in (None, 0) and len(accepted) == 1
    assert [w for w in trainer.config_warnings(accepted[0]) if warning in w], override
