"""Synthetic recall documents mixed into text training (train/data/recall.py, data.recall_fraction)."""

import collections
import re

import numpy as np
import pytest

from bmojo_jax.train import niah
from bmojo_jax.train import tasks
from bmojo_jax.train.data import recall
from bmojo_jax.train.data.packing import IGNORE_INDEX
from bmojo_jax.train.data.tokenizers import ByteTokenizer
T = 1024
SENTENCES = [f"Sentence {i} of the training text is here." for i in range(3000)]
HAYSTACK = " ".join(SENTENCES)


def test_recall_documents_are_answered_niah_prompts_of_training_text():
  tok = ByteTokenizer()
  source = recall.RecallSource(HAYSTACK, tok, T, num_examples=64, seed=3)
  names, lengths = collections.Counter(), []
  for i in range(len(source)):
    task, ids = source.document(i)
    names[task.name] += 1
    lengths.append(ids.size)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and T // 2 + 1 <= ids.size <= T + 1
    text = tok.decode(ids[1:-1])
    prompt, _, answer = text.rpartition(" mentioned in the provided text ")
    verb, _, values = answer.partition(" ")
    assert verb == ("is" if task.queries * task.values == 1 else "are") and values.endswith(".")
    kind = "uuids" if task.value == "uuids" else "numbers"
    queries = re.findall(r".*magic \w+ for (.+)$", prompt.split("\n")[-1])[0].split(", ")
    queries = [q.removeprefix("and ") for q in queries]
    in_context = [v for q in queries for v in re.findall(
        rf"One of the special magic {kind} for {re.escape(q)} is: ([0-9a-f-]+)\.", prompt)]
    assert sorted(values[:-1].split(", ")) == sorted(in_context)        # the answer is what the needles say
    if task.haystack == "essay":                                         # a window of the training text
      body = prompt.split("\n")[1]
      pieces = [p.strip() for p in re.split(r"One of the special magic[^.]*\.", body)]
      assert all(p in HAYSTACK for p in pieces) and any(pieces)
    example = source[i]
    n = ids.size - 1
    np.testing.assert_array_equal(example["inputs"][:n], ids[:-1])
    np.testing.assert_array_equal(example["targets"][:n], ids[1:])
    assert (example["targets"][n:] == IGNORE_INDEX).all() and (example["segment_ids"][n:] == 0).all()
    np.testing.assert_array_equal(example["positions"][:n], np.arange(n))
  assert len(names) == len(niah.TASKS) and len(set(lengths)) > 32    # every task, lengths spread over [T/2, T]
  again = recall.RecallSource(HAYSTACK, tok, T, num_examples=64, seed=3)
  np.testing.assert_array_equal(again[5]["inputs"], source[5]["inputs"])            # deterministic in (seed, i)
  other = recall.RecallSource(HAYSTACK, tok, T, num_examples=64, seed=4)
  assert not np.array_equal(other[5]["inputs"], source[5]["inputs"])


def test_recall_values_are_not_the_evaluation_samples():
  tok = ByteTokenizer()
  source = recall.RecallSource(HAYSTACK, tok, T, num_examples=200, seed=0)
  trained = set()
  for i in range(len(source)):
    trained.update(re.findall(r"is: ([0-9a-f-]{7,36})\.", tok.decode(source.document(i)[1])))
  evaluated = {a for task in niah.TASKS for s in range(20)
               for a in niah.niah_example(task, tok, length=T, gen_tokens=64, essay=HAYSTACK, seed=s).answers}
  assert len(trained) > 200 and not trained & evaluated


def test_recall_documents_near_the_shortest_sequence_redraw_what_does_not_fit():
  tok = ByteTokenizer()
  source = recall.RecallSource(HAYSTACK, tok, 700, num_examples=400)    # MQ-NIAH needs ~650-690 tokens
  tasks_seen = collections.Counter(source.document(i)[0].name for i in range(len(source)))
  assert len(tasks_seen) == len(niah.TASKS) and all(source.document(i)[1].size <= 701 for i in range(0, 400, 7))


def test_recall_source_errors_name_the_setting():
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="needs about .* tokens, more than a sequence of data.seq_len=256"):
    recall.RecallSource(HAYSTACK, tok, 256, num_examples=4)
  with pytest.raises(ValueError, match="the training text has 100 characters"):
    recall.RecallSource("x" * 100, tok, T, num_examples=4)


def _text_config(tmp_path, fraction, seq_len=T):
  import importlib.util
  spec = importlib.util.spec_from_file_location("lm_config", "configs/lm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("transformer,smoke")
  (tmp_path / "docs").mkdir(exist_ok=True)
  for i in range(30):
    (tmp_path / "docs" / f"{i:02d}.txt").write_text(" ".join(SENTENCES[100 * i:100 * i + 100]))
  config.data.paths = str(tmp_path / "docs")
  config.data.seq_len = seq_len
  config.data.eval_fraction = 0.1
  config.data.recall_fraction = fraction
  return config


def test_text_task_mixes_recall_documents_into_training_only(tmp_path):
  plain = tasks.make_task(_text_config(tmp_path, 0.0))
  mixed = tasks.make_task(_text_config(tmp_path, 0.25))
  n_text = plain.info["train_sequences"]
  assert mixed.info["text_sequences"] == n_text
  assert mixed.info["recall_sequences"] == round(n_text / 3) and len(mixed.train_source) == n_text + round(n_text / 3)
  for i in (0, n_text - 1):                                   # the text sequences first, unchanged
    np.testing.assert_array_equal(mixed.train_source[i]["inputs"], plain.train_source[i]["inputs"])
  question = "mentioned in the provided text"
  assert question in ByteTokenizer().decode(mixed.train_source[n_text]["inputs"])
  assert len(mixed.eval_source) == len(plain.eval_source)     # evaluation stays text
  for i in range(len(mixed.eval_source)):
    np.testing.assert_array_equal(mixed.eval_source[i]["inputs"], plain.eval_source[i]["inputs"])
  held_out = ByteTokenizer().decode(plain.eval_source[len(plain.eval_source) - 1]["inputs"][:200])
  haystack = mixed.train_source._second.haystack             # the held-out tail is not in the haystack
  assert " ".join(held_out.split()[3:12]) not in haystack


@pytest.mark.parametrize("fraction, kind, match", [(1.0, "text", r"must be in \[0, 1\)"),
                                                   (-0.1, "text", r"must be in \[0, 1\)"),
                                                   (0.5, "stream", "data.kind=text or corpus, not 'stream'")])
def test_recall_fraction_errors(tmp_path, fraction, kind, match):
  config = _text_config(tmp_path, fraction)
  config.data.kind = kind
  with pytest.raises(ValueError, match=match):
    tasks.make_task(config)
