"""A run trained on the fake package tree's corpus, evaluated end to end: `evaluate_lm_run` (perplexity,
NIAH, the store grown, plots) and `bmojo-eval` on a text folder and a prepared stream (train/lm_eval.py)."""

import json
import os
import re

import pytest

from bmojo_jax.train import lm_eval
from bmojo_jax.train import niah
from bmojo_jax.train import runs
from bmojo_jax.train.data import corpus
from tests.lm_documents import DOCS, lm_config, stream_of, write_package_tree, write_sentencepiece_stream


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """(workdir, corpus folder) of a smoke B'MOJO trained 2 steps (T = 16) on the fake package tree's corpus."""
  from bmojo_jax.train import trainer  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("lm_run")
  write_package_tree(tmp / "root")
  out = tmp / "corpus"
  corpus.prepare(str(out), ("austen", "kjv"), root=str(tmp / "root"), eval_fraction=0.3)   # the fake tree's sources
  config = lm_config(str(out))
  config.train.num_steps, config.train.batch_size, config.train.eval_batch_size = 2, 2, 2
  config.train.progress_bar, config.train.plot = False, False
  workdir = str(tmp / "run")
  trainer.train(config, workdir)
  return workdir, out


@pytest.mark.slow
def test_evaluate_lm_run_end_to_end(trained_run, tmp_path):
  """The trained run evaluated as trained and with its store grown."""
  workdir, _ = trained_run
  record = lm_eval.evaluate_lm_run(workdir, factors=(1, 2), niah=True, niah_factors=(32,), niah_samples=1,
                                   gen_tokens=8, overrides={"n_eidetic": 16},
                                   out=str(tmp_path / "lm.json"))
  assert record["family"] == "bmojo" and record["variant"] == "n_eidetic=16" and record["params"] > 0
  assert record["tokens_trained"] == 2 * 2 * 16 and set(record["eval"]) == {"16", "32"}
  assert set(record["niah"]) == set(niah.TASK_NAMES) and all("512" in v for v in record["niah"].values())
  assert json.loads((tmp_path / "lm.json").read_text())["eval"] == record["eval"]
  with pytest.raises(ValueError, match="change the parameters"):
    runs.load_model(workdir, {"d_state": 4})
  written = lm_eval.plot_records([record], str(tmp_path / "ppl.png"), str(tmp_path / "niah.png"))
  assert all(os.path.getsize(p) > 0 for p in written) and len(written) == 2


# The three bmojo-eval runs and context_perplexity build fresh jitted closures of the same programs: with the
# persistent compilation cache, the later ones read back what the first compiled (not the trained_run fixture's
# training, which nothing reads back and whose cache writes cost more than they save).
@pytest.mark.slow
@pytest.mark.usefixtures("module_compilation_cache")
def test_bmojo_eval_on_a_text_folder_and_on_a_prepared_stream(trained_run, tmp_path, monkeypatch):
  """`bmojo-eval --lm_lengths --niah` with --lm_text (a folder of text files) and --lm_stream (the same files
  prepared by bmojo-prepare): both score those documents, not the run's corpus, and agree; bad paths are refused
  in one line."""
  from tests.test_cli_inputs import run_script  # pylint: disable=g-import-not-at-top
  workdir, corpus_dir = trained_run
  texts = {"a.txt": (DOCS[0] + " ") * 4, "b.txt": (DOCS[1] + " ") * 4, "c.txt": DOCS[2]}
  out = stream_of(texts, tmp_path / "texts", tmp_path / "stream")
  flags = "--lm_lengths=1,2 --niah --niah_lengths=32 --niah_samples=2 --niah_gen_tokens=8 --lm_windows=0"
  records = {}
  for name, given in (("text", f"--lm_text={tmp_path / 'texts'}"), ("stream", f"--lm_stream={out}"),
                      ("heldout", "")):
    code, said, _ = run_script(f"eval --workdir {workdir} {flags} {given}", monkeypatch)
    assert code in (None, 0), said
    records[name] = json.loads(open(os.path.join(workdir, lm_eval.RESULT_FILE)).read())
  text, streamed, heldout = records["text"], records["stream"], records["heldout"]
  model, tok, _, _ = runs.load_model(workdir)
  expected = lm_eval.context_perplexity(model, tok, [texts[k] for k in sorted(texts)], seq_len=16, factors=(1, 2),
                                        max_windows=None)
  assert text["eval"] == streamed["eval"] == expected["eval"] != heldout["eval"]
  assert text["eval_windows"] == expected["eval_windows"] == sum(len(t.encode()) // 32 for t in texts.values())
  assert text["niah"] == streamed["niah"] and set(text["niah"]) == set(niah.TASK_NAMES)
  essay = niah.essay_haystack(texts[k] for k in sorted(texts))     # the folder's text is the essay haystack
  assert ("It is a truth universally acknowledged" in essay and "It is a truth universally acknowledged"
          not in niah.essay_haystack(corpus.read_split(str(corpus_dir), "eval").values()))
  assert [os.path.basename(n) for n in text["heldout_documents"]] == ["a.txt", "b.txt", "c.txt"]
  assert str(tmp_path / "texts") in text["eval_documents"] and out in streamed["eval_documents"]
  assert "token stream" in streamed["niah_haystack"] and "held-out" in heldout["eval_documents"]
  (tmp_path / "empty").mkdir()
  write_sentencepiece_stream(tmp_path / "other")    # a SentencePiece stream of 512 ids
  for given, message in ((f"--lm_lengths=1 --lm_text={tmp_path / 'nope'}", r"Text path does not exist: .*/nope"),
                         (f"--niah --lm_text={tmp_path / 'empty'}", r"No files matching .* under directory: .*/empty"),
                         (f"--lm_lengths=1 --lm_stream={tmp_path / 'nope'}", r"Token stream directory does not exist"),
                         (f"--lm_lengths=1 --lm_stream={tmp_path / 'other'}", r"another tokenizer than the run's"),
                         (f"--lm_lengths=1 --lm_text={tmp_path / 'texts'} --lm_stream={out}", r"give one"),
                         (f"--lm_text={tmp_path / 'texts'}", r"--lm_text names the documents of --lm_lengths"),
                         ("--lm_lengths=1 --lm_stream=", r"--lm_stream is empty")):
    code, said, _ = run_script(f"eval --workdir {workdir} {given}", monkeypatch)
    lines = [l for l in said.splitlines() if l.strip()]
    assert code not in (None, 0) and 1 <= len(lines) <= 2 and "Traceback" not in said, said
    assert re.search(message, said), said
