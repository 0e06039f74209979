"""Language-model evaluation of a trained run: perplexity against context length, and RULER's NIAH tasks.

Perplexity (`context_perplexity`). The held-out documents are cut into windows of the longest context,
`max(factors) x T` tokens (T the training length): BOS + the document's tokens, window j holding tokens
[jC, jC + C] of a document, whole windows only. Only when no document is that long is the held-out text
concatenated (documents joined by a blank line, one BOS) and cut the same way; the result says which
(`eval_text`). One forward pass over these windows scores every position; as every family is causal, the
first c tokens of a window give what a window of c tokens alone gives, so for each context c = f x T:
  * `eval[c]`: the perplexity of every token of the windows' first c tokens (windows of c tokens, loss on all);
  * `eval_last[c]`: the perplexity of their last T tokens, positions [c - T, c) (how well position c - 1 is
    predicted with c tokens of context);
  * `bits_per_token[c]`: eval[c] in bits (bits per byte with the byte tokenizer).
One compile per model, and every context is measured on the same windows.

NIAH (`TASKS`, `niah_example`, `run_niah`), after RULER (docs/evals.md): needles "One of the special magic
{numbers|uuids} for {key} is: {value}." in a haystack of noise sentences, of held-out prose (the essay: the
held-out documents in name order, whitespace collapsed, a fixed prefix), or of distractor needles; the prompt is
RULER's instruction, context, question and answer prefix, filled to exactly `length - gen_tokens` tokens (BOS
included) so the greedy continuation of `gen_tokens` tokens ends at `length`. Score: per sample the fraction of
the reference values found (case-insensitive) in the continuation, x 100, averaged.

`evaluate_lm_run(workdir, ...)` runs both on a bmojo-train run and writes `<workdir>/lm_eval.json`, one record
{family, params, tokens_trained, eval: {context: ppl}, niah: {task: {length: score}}, ...}; `plot_records` draws
perplexity against context and NIAH score against length for records of several runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import uuid
import zlib
from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bmojo_jax import LanguageModel, inference
from bmojo_jax.config import COMPUTE_FIELDS
from bmojo_jax.param_count import count_params
from train import data as data_lib
from train import runs
from train import tasks as tasks_lib

RESULT_FILE = "lm_eval.json"


# ----------------------------------------------------------------------------------------------- perplexity
def document_windows(documents: Sequence[str], tokenizer, length: int,
                     max_windows: int | None = None) -> tuple[np.ndarray, str]:
  """(int32[W, length + 1] windows, "documents" | "concatenated"); see the module docstring.

  With more than max_windows windows, max_windows evenly spaced ones are kept (deterministic)."""
  def cut(stream: np.ndarray) -> list[np.ndarray]:
    return [stream[j * length:(j + 1) * length + 1] for j in range((stream.size - 1) // length)]

  def stream(text: str) -> np.ndarray:
    return np.asarray([tokenizer.bos_id, *tokenizer.encode(text)], np.int32)

  windows = [w for doc in documents for w in cut(stream(doc))]
  source = "documents"
  if not windows:
    windows, source = cut(stream("\n\n".join(documents))), "concatenated"
  if not windows:
    raise ValueError(f"The held-out text is shorter than one window of {length} + 1 tokens: lower the context "
                     "lengths or hold out more text.")
  if max_windows is not None and len(windows) > max_windows:
    windows = [windows[i] for i in np.unique(np.linspace(0, len(windows) - 1, max_windows).round().astype(int))]
  return np.stack(windows), source


def position_nll(model: LanguageModel, windows: np.ndarray, batch_size: int) -> np.ndarray:
  """The NLL at each position averaged over the windows, fp64 [C], of windows [W, C + 1]: the model reads
  tokens [0, C) and predicts tokens [1, C]. One compile: the last batch is padded."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def nll(state, tokens):                                                           # [B, C + 1] -> [B, C]
    logits = nnx.merge(graphdef, state)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])

  n, c = windows.shape[0], windows.shape[1] - 1
  total = np.zeros((c,), np.float64)
  for start in range(0, n, batch_size):
    batch = windows[start:start + batch_size]
    rows = batch.shape[0]
    if rows < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - rows, axis=0)])
    total += np.asarray(jax.device_get(nll(state, jnp.asarray(batch))), np.float64)[:rows].sum(axis=0)
  return total / n


def context_perplexity(model: LanguageModel, tokenizer, documents: Sequence[str], *, seq_len: int,
                       factors: Sequence[int] = (1, 2, 4, 8, 16), max_windows: int | None = 64,
                       batch_tokens: int = 65536) -> dict[str, Any]:
  """Perplexity at contexts f x seq_len for f in factors, on the same windows; see the module docstring."""
  factors = sorted({int(f) for f in factors})
  if not factors or factors[0] < 1:
    raise ValueError(f"context factors must be positive integers, got {factors}.")
  longest = factors[-1] * seq_len
  windows, source = document_windows(documents, tokenizer, longest, max_windows)
  nll = position_nll(model, windows, max(1, batch_tokens // longest))
  out = {"eval": {}, "eval_last": {}, "bits_per_token": {}}
  for f in factors:
    c = f * seq_len
    every, last = nll[:c].mean(), nll[c - seq_len:c].mean()
    out["eval"][str(c)] = float(np.exp(min(every, 80.0)))
    out["eval_last"][str(c)] = float(np.exp(min(last, 80.0)))
    out["bits_per_token"][str(c)] = float(every / math.log(2))
  out.update(eval_text=source, eval_windows=int(windows.shape[0]), eval_window_tokens=longest)
  return out


# ----------------------------------------------------------------------------------------------------- NIAH
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, 40)))    # needle depths, % of the context
NEEDLE = "One of the special magic {type} for {key} is: {value}."
INSTRUCTION = ("Some special magic {type} are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the {type} afterwards.")
QUESTION = ("What are all the special magic {type} for {query} mentioned in the provided text? The special magic "
            "{type} for {query} mentioned in the provided text are")
QUESTION_ONE = ("What is the special magic {type} for {query} mentioned in the provided text? The special magic "
                "{type} for {query} mentioned in the provided text is")
ADJECTIVES = ("able", "afraid", "ancient", "angry", "bitter", "black", "bold", "brave", "bright", "broad", "calm",
              "cheap", "clean", "clever", "cold", "cool", "curly", "damp", "dark", "deep", "dry", "eager", "early",
              "empty", "fair", "fancy", "fast", "fierce", "flat", "fresh", "gentle", "glad", "golden", "good",
              "grand", "green", "grumpy", "happy", "heavy", "hollow", "huge", "icy", "jolly", "kind", "large",
              "lazy", "little", "loud", "lucky", "mighty", "modern", "narrow", "noisy", "odd", "old", "pale",
              "plain", "proud", "quick", "quiet", "rapid", "rich", "round", "royal", "rusty", "sharp", "shiny",
              "silent", "silly", "slow", "small", "smooth", "soft", "sour", "steep", "strange", "strong", "sweet",
              "swift", "tall", "tame", "thick", "thin", "tiny", "vast", "warm", "wet", "wild", "wise", "young")
NOUNS = ("anchor", "apple", "arrow", "badge", "basket", "bell", "blanket", "boat", "bottle", "bridge", "brush",
         "bucket", "button", "candle", "canyon", "carpet", "castle", "chair", "cherry", "cloud", "coin", "comet",
         "cottage", "crown", "desert", "diamond", "drum", "eagle", "engine", "feather", "fiddle", "forest",
         "fountain", "garden", "giraffe", "glove", "hammer", "harbor", "helmet", "island", "jacket", "kettle",
         "ladder", "lantern", "lemon", "library", "meadow", "mirror", "monkey", "needle", "ocean", "orchard",
         "otter", "palace", "panther", "parrot", "pencil", "pepper", "piano", "pillow", "planet", "pocket",
         "pumpkin", "rabbit", "river", "rocket", "saddle", "sailor", "shadow", "shovel", "silver", "spider",
         "statue", "teapot", "thunder", "tiger", "tower", "trumpet", "tunnel", "valley", "violin", "wagon",
         "walrus", "window", "wizard", "zebra")


@dataclasses.dataclass(frozen=True)
class NiahTask:
  """One RULER NIAH task: haystack, key and value kinds, and how many keys / values / queries."""
  name: str
  haystack: str            # noise | essay | needle
  key: str                 # words | uuids
  value: str               # numbers | uuids
  keys: int                # needles with distinct keys in the context (queried keys and distractors)
  values: int              # values per queried key
  queries: int             # keys asked about


TASKS = (
    NiahTask("S-NIAH-1", "noise", "words", "numbers", 1, 1, 1),
    NiahTask("S-NIAH-2", "essay", "words", "numbers", 1, 1, 1),
    NiahTask("S-NIAH-3", "essay", "words", "uuids", 1, 1, 1),
    NiahTask("MK-NIAH-1", "essay", "words", "numbers", 4, 1, 1),
    NiahTask("MK-NIAH-2", "needle", "words", "numbers", 1, 1, 1),
    NiahTask("MK-NIAH-3", "needle", "uuids", "uuids", 1, 1, 1),
    NiahTask("MV-NIAH", "essay", "words", "numbers", 1, 4, 1),
    NiahTask("MQ-NIAH", "essay", "words", "numbers", 4, 1, 4),
)
TASK_NAMES = tuple(t.name for t in TASKS)


class NiahTooShort(ValueError):
  """The length leaves no room for the haystack: the template, needles and generation budget fill it."""


@dataclasses.dataclass(frozen=True)
class NiahExample:
  prompt: str
  ids: list[int]                 # BOS + the prompt's tokens
  queries: tuple[str, ...]       # keys asked about
  answers: tuple[str, ...]       # the reference values


def _draw(kind: str, rng: np.random.Generator, taken: set[str]) -> str:
  """A key or value of `kind` (words | numbers | uuids) not in `taken` (then added to it)."""
  for _ in range(10000):
    if kind == "words":
      item = f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"
    elif kind == "numbers":
      item = str(int(rng.integers(1_000_000, 10_000_000)))
    else:
      item = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    if item not in taken:
      taken.add(item)
      return item
  raise ValueError(f"ran out of distinct {kind} ({len(taken)} drawn)")


def essay_haystack(documents: Sequence[str]) -> str:
  """The essay haystack: documents joined in the given order, whitespace collapsed to single spaces."""
  return " ".join(" ".join(doc.split()) for doc in documents)


def _sentences(text: str) -> list[str]:
  return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def _haystack(task: NiahTask, essay: str, chars: int, rng: np.random.Generator, taken: set[str]) -> str:
  """At least `chars` characters of the task's haystack: noise blocks or distractor needles one a line, or
  the essay (repeated if it is shorter)."""
  if task.haystack == "noise":
    return "\n".join([NOISE] * (chars // len(NOISE) + 1))
  if task.haystack == "needle":
    lines, size = [], 0
    while size < chars:
      lines.append(NEEDLE.format(type=task.value, key=_draw(task.key, rng, taken),
                                 value=_draw(task.value, rng, taken)))
      size += len(lines[-1]) + 1
    return "\n".join(lines)
  if not essay.strip():
    raise ValueError("the essay haystack is empty: no held-out text.")
  return " ".join([essay] * (chars // len(essay) + 1))[:chars]


def _largest(fits, hi: int) -> int:
  """The largest n in [0, hi] with fits(n), for fits true at 0 and monotone (binary search)."""
  lo = 0
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
  return lo


def niah_example(task: NiahTask, tokenizer, *, length: int, gen_tokens: int, essay: str,
                 seed: int) -> NiahExample:
  """One sample of `task` whose BOS + prompt is exactly `length - gen_tokens` tokens where the tokenizer allows
  (the byte tokenizer always); deterministic in (task, length, seed). Raises NiahTooShort when the template,
  needles and generation budget do not fit in `length`."""
  rng = np.random.default_rng([seed, zlib.crc32(task.name.encode()), length])
  taken: set[str] = set()
  keys = [_draw(task.key, rng, taken) for _ in range(max(task.keys, task.queries))]
  queries = keys[:task.queries]
  values = {k: [_draw(task.value, rng, taken) for _ in range(task.values if k in queries else 1)] for k in keys}
  plural = task.value                                                    # "numbers" | "uuids"
  needles = [NEEDLE.format(type=plural, key=k, value=v) for k in keys for v in values[k]]
  depths = rng.choice(DEPTHS, size=len(needles), replace=len(needles) > len(DEPTHS))
  answers = tuple(v for k in queries for v in values[k])
  query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
  question = (QUESTION_ONE.format(type=plural[:-1], query=query) if len(answers) == 1
              else QUESTION.format(type=plural, query=query))
  head = INSTRUCTION.format(type=plural)

  budget = length - gen_tokens                                           # BOS + prompt
  haystack = _haystack(task, essay, 8 * length, rng, taken)

  def prompt(n_chars: int, pad: int = 0) -> str:
    text = haystack[:n_chars]
    if task.haystack == "essay":
      units, sep = _sentences(text), " "
    else:
      if task.haystack == "needle" and n_chars < len(haystack) and haystack[n_chars] != "\n":
        text = text.rpartition("\n")[0]                                  # no partial distractor needle
      units, sep = [u for u in text.split("\n") if u], "\n"
    at = [int(round(d / 100 * len(units))) for d in depths]
    for i in sorted(range(len(needles)), key=lambda i: (at[i], i), reverse=True):
      units.insert(at[i], needles[i])
    return f"{head}\n{sep.join(units)}{' ' * pad}\n{question}"

  def count(text: str) -> int:
    return 1 + len(tokenizer.encode(text))

  if count(prompt(0)) > budget:
    raise NiahTooShort(f"{task.name} at length {length}: the template and needles take {count(prompt(0))} "
                       f"tokens and {gen_tokens} are generated, more than {length}.")
  n_chars = _largest(lambda n: count(prompt(n)) <= budget, len(haystack))
  pad = _largest(lambda p: count(prompt(n_chars, p)) <= budget, budget)  # spaces make up the rest
  text = prompt(n_chars, pad)
  return NiahExample(text, [tokenizer.bos_id, *tokenizer.encode(text)], tuple(queries), answers)


def niah_score(prediction: str, answers: Sequence[str]) -> float:
  """RULER's string_match_all: the fraction of answers found (case-insensitive) in the prediction."""
  p = prediction.lower()
  return sum(a.lower() in p for a in answers) / len(answers)


def run_niah(model: LanguageModel, tokenizer, essay: str, *, lengths: Sequence[int], samples: int = 50,
             gen_tokens: int = 128, seed: int = 0,
             tasks: Sequence[NiahTask] = TASKS) -> tuple[dict[str, dict[str, float | None]], list[str]]:
  """({task: {length: score or None}}, notes): greedy continuations through `bmojo_jax.inference`; a length
  that cannot run (too short for the template, a cache that cannot hold it) scores None with a note."""
  decoder = inference.Decoder(model)
  scores: dict[str, dict[str, float | None]] = {}
  notes = []
  for task in tasks:
    scores[task.name] = {}
    for length in lengths:
      try:
        examples = [niah_example(task, tokenizer, length=int(length), gen_tokens=gen_tokens, essay=essay,
                                 seed=seed * 100_003 + i) for i in range(samples)]
        new = inference.generate(decoder, [e.ids for e in examples], max_new_tokens=gen_tokens,
                                 eos_id=tokenizer.eos_id)
      except (ValueError, jax.errors.JaxRuntimeError) as e:   # too short; a cache the model cannot fill; memory
        scores[task.name][str(length)] = None
        notes.append(f"NIAH {task.name} at {length} not run: {str(e).splitlines()[0]}")
        continue
      per_sample = [niah_score(tokenizer.decode(t), e.answers) for t, e in zip(new, examples)]
      scores[task.name][str(length)] = 100.0 * float(np.mean(per_sample))
  return scores, notes


# ------------------------------------------------------------------------------------------------ runs
def heldout_documents(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{name: text} of a run's held-out documents, in name order: the eval split of its corpus (data.kind=corpus)
  or its data.eval_paths files; whole documents are needed, so a run that held out a fraction of its packed
  sequences instead is refused."""
  d = config.data
  if d.kind == "corpus":
    from train.data import corpus  # pylint: disable=g-import-not-at-top
    return corpus.read_split(str(d.corpus_dir), "eval")
  if d.kind == "text":
    _, eval_paths, patterns = tasks_lib.text_paths(config)
    if eval_paths:
      files = data_lib.list_text_files(eval_paths, patterns)
      return {f: t for f, t in zip(files, data_lib.read_text_files(files, patterns))}
  raise ValueError(f"data.kind={d.kind!r} without data.eval_paths has no held-out documents; length and NIAH "
                   "evaluation needs data.kind=corpus or data.eval_paths.")


def parse_overrides(spec: str) -> dict[str, Any]:
  """"n_eidetic=256,attn_impl=reference" -> {"n_eidetic": 256, "attn_impl": "reference"}."""
  out = {}
  for item in (s.strip() for s in (spec or "").split(",")):
    if item:
      name, sep, value = item.partition("=")
      if not sep:
        raise ValueError(f"model override {item!r} is not field=value.")
      out[name.strip()] = int(value) if re.fullmatch(r"-?\d+", value.strip()) else value.strip()
  return out


def _shapes(tree) -> list[tuple[str, tuple[int, ...]]]:
  return [(jax.tree_util.keystr(path), tuple(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def load_lm(workdir: str, overrides: dict[str, Any] | None = None,
            config: ml_collections.ConfigDict | None = None):
  """(model, tokenizer, config, step) of the latest checkpoint of a text run. `overrides` change model fields
  at evaluation: how it computes (scan_impl, attn_impl, dtype, ...) or sizes without parameters (n_eidetic:
  B'MOJO's store grown at inference); the parameters are the trained ones. `config` replaces the workdir's
  config.json."""
  overrides = dict(overrides or {})
  config = config or runs.load_config(workdir)
  compute = {k: overrides.pop(k) for k in list(overrides) if k in COMPUTE_FIELDS}
  if compute:
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.update(compute)
  setup, params, step = runs.load_run(workdir, config, with_task=False)
  graphdef = setup.graphdef
  if overrides:
    unknown = [k for k in overrides if not hasattr(setup.cfg, k)]
    if unknown:
      raise ValueError(f"model overrides {unknown} name no ModelConfig field.")
    cfg = setup.cfg.replace(**overrides)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    if _shapes(nnx.to_pure_dict(abstract)) != _shapes(params):
      raise ValueError(f"model overrides {overrides} change the parameters; only fields without parameters "
                       "(e.g. n_eidetic) can differ from training.")
  with open(os.path.join(workdir, runs.TOKENIZER_FILE), encoding="utf-8") as f:
    tokenizer = tasks_lib.load_tokenizer(json.load(f), workdir)
  if tokenizer is None:
    raise ValueError(f"{workdir} is not a text run (no tokenizer): language-model evaluation needs one.")
  return nnx.merge(graphdef, params), tokenizer, config, step


def evaluate_lm_run(workdir: str, *, factors: Sequence[int] = (1, 2, 4, 8, 16), niah: bool = False,
                    niah_factors: Sequence[int] = (1, 2, 4), niah_samples: int = 50, gen_tokens: int = 128,
                    max_windows: int | None = 64, batch_tokens: int = 65536, overrides: dict | None = None,
                    seed: int = 0, out: str | None = None,
                    config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Perplexity at factors x T and (with niah) the NIAH tasks at niah_factors x T for the run in `workdir`
  (with `config` instead of its config.json if given); the record is written to `out` (default
  <workdir>/lm_eval.json) and returned."""
  model, tokenizer, config, step = load_lm(workdir, overrides, config)
  cfg, seq_len = model.cfg, int(config.data.seq_len)
  documents = heldout_documents(config)
  names = list(documents)
  record = {"family": cfg.family.value, "variant": ",".join(f"{k}={v}" for k, v in (overrides or {}).items()),
            "params": count_params(cfg), "tokens_trained": int(step) * int(config.train.batch_size) * seq_len,
            "step": int(step), "seq_len": seq_len, "workdir": os.path.abspath(workdir),
            "tokenizer": str(config.data.tokenizer), "heldout_documents": names, "notes": []}
  if factors:
    try:
      record.update(context_perplexity(model, tokenizer, list(documents.values()), seq_len=seq_len,
                                       factors=factors, max_windows=max_windows, batch_tokens=batch_tokens))
    except (ValueError, jax.errors.JaxRuntimeError) as e:   # no text that long; out of device memory
      record["notes"].append(f"perplexity not run: {str(e).splitlines()[0]}")
  if niah:
    lengths = [int(f) * seq_len for f in niah_factors]
    scores, notes = run_niah(model, tokenizer, essay_haystack(list(documents.values())), lengths=lengths,
                             samples=niah_samples, gen_tokens=gen_tokens, seed=seed)
    record.update(niah=scores, niah_samples=niah_samples, niah_gen_tokens=gen_tokens,
                  niah_haystack=f"essay: held-out documents in name order from {names[0]}; noise; needles")
    record["notes"] += notes
  out = out or os.path.join(workdir, RESULT_FILE)
  if jax.process_index() == 0:
    with open(out, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)
  return record


# ----------------------------------------------------------------------------------------------- plots
def _label(record: dict) -> str:
  return record["family"] + (f" ({record['variant']})" if record.get("variant") else "")


def plot_records(records: Sequence[dict], ppl_path: str | None, niah_path: str | None) -> list[str]:
  """Perplexity against context (one line per record) and NIAH score against length (one panel per task);
  returns the files written (a figure with nothing to draw is skipped). ImportError without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the plots need matplotlib: pip install matplotlib") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  written = []
  with_ppl = [r for r in records if r.get("eval")]
  if ppl_path and with_ppl:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("eval", "eval_last"), ("every token of the window", "last T tokens")):
      contexts = sorted({int(c) for r in with_ppl for c in r[key]})
      for r in with_ppl:
        x = sorted(int(c) for c in r[key])
        ax.plot(x, [r[key][str(c)] for c in x], marker="o", label=_label(r))
      ax.axvline(with_ppl[0]["seq_len"], color="gray", ls=":", lw=1)
      ax.set_xscale("log", base=2)
      ax.set_xticks(contexts, [str(c) for c in contexts])
      ax.set(xlabel="context (tokens; dotted: training length)", ylabel="perplexity", title=title)
      ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ppl_path, dpi=120)
    plt.close(fig)
    written.append(ppl_path)
  with_niah = [r for r in records if r.get("niah")]
  if niah_path and with_niah:
    names = [t for t in TASK_NAMES if any(t in r["niah"] for r in with_niah)]
    cols = 4
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(13, 3 * ((len(names) + 3) // 4)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
      for r in with_niah:
        points = sorted((int(k), v) for k, v in r["niah"].get(name, {}).items() if v is not None)
        if points:
          ax.plot(*zip(*points), marker="o", label=_label(r))
      lengths = sorted({int(k) for r in with_niah for k in r["niah"].get(name, {})})
      ax.set_xscale("log", base=2)
      ax.set_xticks(lengths, [str(n) for n in lengths])
      ax.set(title=name, xlabel="length (tokens)", ylabel="score", ylim=(-3, 103))
      ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
      ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(niah_path, dpi=120)
    plt.close(fig)
    written.append(niah_path)
  return written
