"""RULER's needle-in-a-haystack tasks for a trained language model (docs/evals.md, docs/lm.md).

`TASKS`, `niah_example`, `run_niah`: needles "One of the special magic
{numbers|uuids} for {key} is: {value}." in a haystack of noise sentences, of held-out prose (the essay: the
held-out documents in name order, whitespace collapsed, a fixed prefix), or of distractor needles; the prompt is
RULER's instruction, context, question and answer prefix, filled to exactly `length - gen_tokens` tokens (BOS
included) so the greedy continuation of `gen_tokens` tokens ends at `length`. Score: per sample the fraction of
the reference values found (case-insensitive) in the continuation, x 100, averaged.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
import zlib
from typing import Iterable, Sequence

import jax
import numpy as np

from bmojo_jax import LanguageModel, inference

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACK_CHARS = 8                          # characters of haystack drawn per token of a sample's length
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
  """The length leaves no room for the haystack: the template, needles and generation budget fill it.
  `needed`: the shortest length that holds them (with this sample's keys and values)."""

  def __init__(self, message: str, needed: int):
    super().__init__(message)
    self.needed = needed


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


def essay_haystack(documents: Iterable[str], max_length: int | None = None) -> str:
  """The essay haystack: documents joined in the given order, whitespace collapsed to single spaces. With
  `max_length` (the longest NIAH length in tokens), documents are read only until the essay holds the
  HAYSTACK_CHARS x max_length characters a sample takes, so the haystacks are those of all the documents."""
  parts, size = [], -1                               # size: the characters of " ".join(parts)
  for doc in documents:
    if max_length is not None and size >= HAYSTACK_CHARS * max_length:
      break
    parts.append(" ".join(doc.split()))
    size += len(parts[-1]) + 1
  return " ".join(parts)


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
  haystack = _haystack(task, essay, HAYSTACK_CHARS * length, rng, taken)

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
                       f"tokens and {gen_tokens} are generated, more than {length}.", count(prompt(0)) + gen_tokens)
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


