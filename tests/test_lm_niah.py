"""The NIAH examples (essay, noise and needle haystacks), their scoring, and `run_niah` decoding them
(train/niah.py)."""

import re

import pytest

from bmojo_jax.train import niah
from bmojo_jax.train.data.tokenizers import ByteTokenizer
from tests.lm_documents import DOCS

ESSAY = niah.essay_haystack([DOCS[0] + " " + DOCS[1]] * 3)


@pytest.mark.parametrize("task", niah.TASKS, ids=niah.TASK_NAMES)
def test_niah_examples_hold_their_needles_and_fill_the_length(task):
  tok = ByteTokenizer()
  e = niah.niah_example(task, tok, length=2048, gen_tokens=128, essay=ESSAY, seed=7)
  assert len(e.ids) == 2048 - 128 and tok.decode(e.ids) == e.prompt and e.ids[0] == tok.bos_id
  assert len(e.queries) == task.queries and len(e.answers) == task.values * task.queries
  kind = "uuids" if task.value == "uuids" else "numbers"
  needle = r"One of the special magic {} for {} is: ([0-9a-f-]+)\."
  found = [v for k in e.queries for v in re.findall(needle.format(kind, re.escape(k)), e.prompt)]
  assert sorted(found) == sorted(e.answers)                           # a perfect reader answers from the context
  needles = re.findall(r"One of the special magic \w+ for (\S+) is:", e.prompt)
  assert len(needles) >= task.keys * (task.values if task.keys == 1 else 1)
  assert e.prompt.rstrip().endswith("mentioned in the provided text " + ("is" if len(e.answers) == 1 else "are"))
  assert all(q in e.prompt.split("\n")[-1] for q in e.queries)
  if task.haystack == "essay":
    assert "It is a truth universally acknowledged" in e.prompt
  if task.haystack == "noise":
    assert niah.NOISE in e.prompt
  if task.haystack == "needle":
    assert len(needles) > 5
  assert e == niah.niah_example(task, tok, length=2048, gen_tokens=128, essay=ESSAY, seed=7)   # deterministic
  assert e.answers != niah.niah_example(task, tok, length=2048, gen_tokens=128, essay=ESSAY, seed=8).answers


def test_niah_too_short_and_scoring():
  with pytest.raises(niah.NiahTooShort, match="MQ-NIAH at length 512"):
    niah.niah_example(niah.TASKS[-1], ByteTokenizer(), length=512, gen_tokens=128, essay=ESSAY, seed=0)
  assert niah.niah_score(": 1234567.\nThe", ["1234567"]) == 1.0
  assert niah.niah_score("1234567 and 7654321", ["7654321", "1234567", "1111111", "2222222"]) == 0.5
  assert niah.niah_score("ABCDEF12-3456", ["abcdef12-3456"]) == 1.0
  assert niah.niah_score("123456", ["1234567"]) == 0.0


def test_run_niah_decodes_and_notes_what_cannot_run(tiny_lm):
  tok = ByteTokenizer()
  tasks_ = [t for t in niah.TASKS if t.name in ("S-NIAH-1", "MQ-NIAH")]
  scores, notes = niah.run_niah(tiny_lm, tok, ESSAY, lengths=[512], samples=2, gen_tokens=16, tasks=tasks_)
  assert 0.0 <= scores["S-NIAH-1"]["512"] <= 100.0
  assert scores["MQ-NIAH"]["512"] is None and "MQ-NIAH at 512 not run" in notes[0]


def test_essay_reads_documents_only_as_far_as_the_haystacks_need():
  read = []

  def documents():
    for i in range(100):
      read.append(i)
      yield f"Document {i}  says\n  this. " * 20
  essay = niah.essay_haystack(documents(), max_length=1024)
  every = niah.essay_haystack(f"Document {i}  says\n  this. " * 20 for i in range(100))
  assert len(essay) >= niah.HAYSTACK_CHARS * 1024 and len(read) < 30 and every.startswith(essay)
  for task in niah.TASKS:                                     # the samples of every document
    assert (niah.niah_example(task, ByteTokenizer(), length=1024, gen_tokens=128, essay=essay, seed=3) ==
            niah.niah_example(task, ByteTokenizer(), length=1024, gen_tokens=128, essay=every, seed=3))

