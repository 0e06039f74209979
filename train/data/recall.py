"""Synthetic recall documents mixed into language-model training (`data.recall_fraction`, docs/lm.md).

Recall studies train on a mix of text and synthetic retrieval documents so that a small model learns the
format of a retrieval question; then what NIAH measures is whether the model can find the needle at a given
length, not whether it has ever seen a question. `RecallSource` makes those documents from RULER's NIAH tasks
(`train/niah.py`): example i is one task's prompt (instruction, haystack with its needles, question) followed by
its answer, as one document

    BOS + prompt + " " + ", ".join(answers) + "." + EOS      at most seq_len + 1 tokens

in the packed-example format (`packing.window_example`; the tokens after EOS are padding, target -100).

- **The haystack is training text**: a window of `haystack` (the training documents, whitespace collapsed) at a
  random offset per example, so the held-out documents NIAH is measured on never appear in training.
- **Keys and values** come from a seed stream of their own (`niah_example` seeds >= 2**40; evaluation uses
  seeds below 2**32), so no evaluation sample is a training document; with ~7.8k word keys and 9M numbers a
  key or value may recur, but never its haystack, depth and partner together.
- **Per example**, deterministically from (seed, i): the task (uniform over `niah.TASKS`) and the document's
  length (uniform in [seq_len / 2, seq_len] + 1 tokens, or from the task's shortest where its template needs
  more), so the question ends at varied positions, as it does at evaluation, where `gen_tokens` of the length
  are left for the answer.
"""

import numpy as np

from bmojo_jax.train import niah
from bmojo_jax.train.data import packing
from bmojo_jax.train.data.tokenizers import Tokenizer

_SEED_BASE = 1 << 40                 # niah_example seeds of training documents start here (evaluation: < 2**32)
_STREAM = 0x7EC411                   # names this generator's draws in its rng key
_TRIES = 32                          # lengths tried for a document whose template does not fit the one drawn


def answer_text(answers) -> str:
  """The answer appended to a recall prompt: RULER's question ends "... is" / "... are"."""
  return " " + ", ".join(answers) + "."


class RecallSource:
  """`num_examples` synthetic recall documents as packed examples {inputs, targets, segment_ids, positions}:
  int32[seq_len] each; random access, pickles (grain worker processes)."""

  def __init__(self, haystack: str, tokenizer: Tokenizer, seq_len: int, num_examples: int, seed: int = 0):
    haystack = " ".join(haystack.split())
    self.min_chars = niah.HAYSTACK_CHARS * (seq_len + 1)           # what niah_example reads of the essay
    if len(haystack) < self.min_chars:
      raise ValueError(f"data.recall_fraction: the training text has {len(haystack)} characters, fewer than the "
                       f"{self.min_chars} a recall document of seq_len={seq_len} reads as its haystack; add text "
                       "or set data.recall_fraction=0.")
    if num_examples < 1:
      raise ValueError(f"RecallSource needs num_examples >= 1, got {num_examples}.")
    self.haystack, self.tokenizer = haystack, tokenizer
    self.seq_len, self.num_examples, self.seed = int(seq_len), int(num_examples), int(seed)
    for task in niah.TASKS:          # every task's template must fit one sequence
      try:
        self._tokens(task, self.seq_len + 1, 0)
      except niah.NiahTooShort as e:
        raise ValueError(f"data.recall_fraction: a recall document of {task.name} needs about {e.needed} tokens, "
                         f"more than a sequence of data.seq_len={seq_len} holds; raise data.seq_len (RULER's "
                         "templates need ~700 bytes) or set data.recall_fraction=0.") from None

  def __len__(self) -> int:
    return self.num_examples

  def _tokens(self, task: niah.NiahTask, length: int, i: int) -> np.ndarray:
    """int32[<= length]: BOS + prompt + answer + EOS of example i of `task`, `length` tokens at most."""
    rng = np.random.default_rng([_STREAM, self.seed, i])
    offset = int(rng.integers(0, len(self.haystack) - self.min_chars + 1))
    essay = self.haystack[offset:offset + self.min_chars]
    # answer + EOS: k values of 7 (numbers) or 36 (uuids) bytes, a space before the first, ", " between, "."
    answer_bytes = task.queries * task.values * ((36 if task.value == "uuids" else 7) + 2) + 1
    example = niah.niah_example(task, self.tokenizer, length=length, gen_tokens=answer_bytes, essay=essay,
                                seed=_SEED_BASE + (self.seed << 32) + i)
    answer = self.tokenizer.encode(answer_text(example.answers))
    ids = np.asarray([*example.ids, *answer, self.tokenizer.eos_id], np.int32)
    if ids.size > length:
      raise ValueError(f"recall document {i} ({task.name}) has {ids.size} tokens, more than {length}: its "
                       f"answer took {len(answer)} tokens.")
    return ids

  def document(self, i: int) -> tuple[niah.NiahTask, np.ndarray]:
    """(task, tokens) of example i."""
    if not 0 <= int(i) < self.num_examples:
      raise IndexError(f"RecallSource index {i} out of range [0, {self.num_examples}).")
    rng = np.random.default_rng([_STREAM, self.seed, int(i), 1])
    task = niah.TASKS[int(rng.integers(len(niah.TASKS)))]
    length = int(rng.integers(self.seq_len // 2 + 1, self.seq_len + 2))
    for _ in range(_TRIES):
      try:
        return task, self._tokens(task, length, int(i))
      except niah.NiahTooShort as e:   # the template with these keys needs more: a length from there up (new keys)
        length = int(rng.integers(min(e.needed, self.seq_len + 1), self.seq_len + 2))
    raise ValueError(f"recall document {i} ({task.name}): no draw of keys fit data.seq_len={self.seq_len} in "
                     f"{_TRIES} tries; raise data.seq_len.")

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    _, ids = self.document(i)
    return packing.window_example(ids, np.zeros((1,), np.int64), 0, self.seq_len, self.tokenizer.pad_id)
