"""Language models on real text: the corpus of Debian packages (on a fake package tree), the split by whole
documents, perplexity against context, and the NIAH examples and scoring (train/data/corpus.py,
train/lm_eval.py)."""

import glob
import gzip
import json
import os
import re
import stat
import struct
import zlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bmojo_jax import LanguageModel
from bmojo_jax.train import lm_eval
from bmojo_jax.train import niah
from bmojo_jax.train import runs
from bmojo_jax.train import tasks
from bmojo_jax.train.data import corpus
from bmojo_jax.train.data import debian_texts
from bmojo_jax.train.data import prepare
from bmojo_jax.train.data import sources
from bmojo_jax.train.data import stream
from bmojo_jax.train.data.tokenizers import ByteTokenizer
from tests.conftest import tiny_config

EMMA = ["EMMA", "", "By Jane Austen", "", "", "", "", "CHAPTER I", "",
        "Emma Woodhouse, handsome, clever, and rich,   ", "with a comfortable home.", "", "", "", "", "FINIS", ""]
NORTHANGER = ["NORTHANGER ABBEY", "", "No one who had ever seen Catherine Morland in her infancy.", "",
              "A NOTE ON THE TEXT", "", "Northanger Abbey was written in 1797-98."]
BIBLE_OUTPUT = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void.

Genesis 2

  1 Thus the heavens and the earth were finished.

1 Samuel 1

  1 Now there was a certain man of Ramathaimzophim.

Song of Solomon 1

  1 The song of songs, which is Solomon's.
"""


# ------------------------------------------------------------------------ a fake package tree (no apt)
def _i(v: int) -> bytes:
  return struct.pack(">i", v)


def _chars(s: str) -> bytes:
  b = s.encode("utf-8")
  return _i(0x00040009) + _i(len(b)) + b


def _strings(values) -> bytes:
  return _i(16) + _i(len(values)) + b"".join(_chars(v) for v in values)


def _names_attr(names, first: bool) -> bytes:
  """A pairlist {names = names}: the symbol `names` in full the first time, then as a reference (R's way)."""
  symbol = _i(1) + _chars("names") if first else _i(255 | (1 << 8))
  return _i(2 | (1 << 10)) + symbol + _strings(names) + _i(254)


def _serialize(body: bytes) -> bytes:
  return b"X\n" + _i(3) + _i(0x40201) + _i(0x30500) + _i(5) + b"UTF-8" + body


def write_austen(root, novels: dict[str, list[str]]) -> None:
  """Rdata.rdb / Rdata.rdx as R writes a data package's lazy-load database (zlib blocks, gzip index)."""
  folder = root / debian_texts.AUSTEN_DATA
  folder.mkdir(parents=True)
  blocks, offsets = b"", []
  for lines in novels.values():
    raw = _serialize(_strings(lines))
    block = struct.pack(">I", len(raw)) + zlib.compress(raw)
    offsets.append((len(blocks), len(block)))
    blocks += block
  (folder / "Rdata.rdb").write_bytes(blocks)
  variables = (_i(19 | (1 << 9)) + _i(len(novels)) + b"".join(_i(13) + _i(2) + _i(o) + _i(n) for o, n in offsets)
               + _names_attr(list(novels), first=True))
  index = (_i(19 | (1 << 9)) + _i(3) + variables + _i(19) + _i(0) + _i(10) + _i(1) + _i(1)
           + _names_attr(["variables", "references", "compressed"], first=False))
  (folder / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index)))


def write_bible(root) -> None:
  """The `bible` program (a script printing chapters as bible-kjv does) and bible-kjv-text's data file."""
  program = root / debian_texts.KJV_PROGRAM
  program.parent.mkdir(parents=True)
  program.write_text(f"#!/bin/sh\ncat <<'EOF'\n{BIBLE_OUTPUT}EOF\n")
  program.chmod(program.stat().st_mode | stat.S_IEXEC)
  data = root / debian_texts.KJV_DATA
  data.parent.mkdir(parents=True, exist_ok=True)
  data.write_bytes(b"\0")


@pytest.fixture
def package_tree(tmp_path):
  root = tmp_path / "root"
  write_austen(root, {"emma": EMMA, "northangerabbey": NORTHANGER})
  write_bible(root)
  return root


def test_corpus_reads_the_packages_and_prepares_documents(package_tree, tmp_path):
  docs = {**debian_texts.austen_documents(str(package_tree)), **debian_texts.kjv_documents(str(package_tree))}
  assert sorted(docs) == ["austen/emma", "austen/northangerabbey", "kjv/1-samuel", "kjv/genesis",
                          "kjv/song-of-solomon"]
  emma = docs["austen/emma"]
  assert emma.startswith("EMMA\n\nBy Jane Austen\n\n\nCHAPTER I\n") and emma.endswith("\n\n\nFINIS\n")
  assert "rich,\nwith" in emma                                        # trailing spaces dropped
  assert "NOTE ON THE TEXT" not in docs["austen/northangerabbey"]    # the edition's note is not Austen's
  assert docs["kjv/genesis"] == ("Genesis 1\n\n1 In the beginning God created the heaven and the earth.\n"
                                 "2 And the earth was without form, and void.\n\nGenesis 2\n\n"
                                 "1 Thus the heavens and the earth were finished.\n")
  out = tmp_path / "corpus"
  sources = ("austen", "kjv")
  manifest = corpus.prepare(str(out), sources, root=str(package_tree), eval_fraction=0.3)
  assert corpus.prepare(str(out), sources, root=str(package_tree), eval_fraction=0.3) == manifest   # replaces itself
  with pytest.raises(ValueError, match="holds no prepared corpus"):
    corpus.prepare(str(tmp_path), sources, root=str(package_tree))   # a folder with other things in it is left alone
  for entry in manifest["documents"]:
    path = out / entry["split"] / (entry["name"] + ".txt")
    assert path.read_text(encoding="utf-8") == docs[entry["name"]]   # whole documents, unchanged
    assert not (out / ("eval" if entry["split"] == "train" else "train") / (entry["name"] + ".txt")).exists()
  totals = manifest["totals"]
  assert totals["train"]["documents"] + totals["eval"]["documents"] == 5
  held = corpus.read_split(str(out), "eval")
  assert totals["eval"]["bytes"] == sum(len(t.encode()) for n, t in docs.items() if n in held)
  # The trainer's corpus task reads the two folders; data.paths alongside it is refused.
  config = _lm_config(str(out))
  task = tasks.make_task(config)
  assert task.info["corpus_dir"] == str(out) and len(task.eval_source) >= 2
  assert lm_eval.heldout_documents(config) == corpus.read_split(str(out), "eval")
  config.data.max_eval_sequences = 1                                  # evenly spaced test sequences kept
  assert len(tasks.make_task(config).eval_source) == 1
  config.data.paths = "elsewhere"
  with pytest.raises(ValueError, match="data.kind=corpus reads data.corpus_dir"):
    tasks.make_task(config)


def _lm_config(corpus_dir: str):
  from bmojo_jax.configs import lm  # pylint: disable=g-import-not-at-top
  config = lm.get_config("bmojo,smoke")
  config.data.kind, config.data.corpus_dir, config.data.seq_len = "corpus", corpus_dir, 16
  return config


def test_split_is_by_whole_documents_and_deterministic():
  names = [f"kjv/book-{i}" for i in range(60)] + [f"austen/novel-{i}" for i in range(6)]
  split = corpus.split_documents(names, 0.1)
  assert split == corpus.split_documents(list(reversed(names)), 0.1)          # order does not matter
  assert set(split) == set(names) and set(split.values()) == {"train", "eval"}
  assert any(split[n] == "eval" for n in names if n.startswith("austen/"))    # each source holds one out
  held = [n for n in names if split[n] == "eval"]
  assert all(corpus.name_hash(n) < 0.1 or n == min((m for m in names if m.startswith(n.split("/")[0])),
                                                   key=corpus.name_hash) for n in held)
  # A document's side depends on its own name only (adding documents does not move it).
  more = corpus.split_documents(names + [f"kjv/extra-{i}" for i in range(20)], 0.1)
  assert all(more[n] == split[n] for n in names if n.startswith("kjv/"))
  with pytest.raises(ValueError, match="eval_fraction"):
    corpus.split_documents(names, 1.0)


def write_perl_doc(root, pages: dict[str, str], version: str = "5.36.0") -> None:
  """perl-doc's pod folder, with the <major.minor> link Debian adds beside it."""
  folder = root / "usr/share/perl" / version / "pod"
  folder.mkdir(parents=True)
  for page, text in pages.items():
    (folder / f"{page}.pod").write_text(text, encoding="utf-8")
  (root / "usr/share/perl" / version.rsplit(".", 1)[0]).symlink_to(version)


def test_perl_doc_pages_are_documents(tmp_path):
  write_perl_doc(tmp_path, {"perlfunc": "=head1 NAME\n\nperlfunc - Perl builtin functions   \n",
                            "perlre": "=head1 NAME\n\nperlre - Perl regular expressions\n"})
  docs = debian_texts.perl_documents(str(tmp_path))
  assert docs == {"perl/perlfunc": "=head1 NAME\n\nperlfunc - Perl builtin functions\n",
                  "perl/perlre": "=head1 NAME\n\nperlre - Perl regular expressions\n"}   # the link read once


def test_missing_packages_are_named(tmp_path):
  # Every missing package of every source in one message, with one install line; nothing written.
  with pytest.raises(debian_texts.MissingPackageError) as err:
    corpus.prepare(str(tmp_path / "out"), root=str(tmp_path))
  assert err.value.packages == ["bible-kjv", "bible-kjv-text", "perl-doc"]
  assert "apt-get install -y --no-install-recommends bible-kjv bible-kjv-text perl-doc ;" in str(err.value)
  assert "\n" not in str(err.value)
  with pytest.raises(debian_texts.MissingPackageError,
                     match=r"apt-get install -y --no-install-recommends r-cran-janeaustenr bible-kjv bible-kjv-text ;"):
    corpus.prepare(str(tmp_path / "out"), ("austen", "kjv"), root=str(tmp_path))
  write_austen(tmp_path, {"emma": EMMA})
  with pytest.raises(debian_texts.MissingPackageError, match=r"--no-install-recommends bible-kjv bible-kjv-text ;"):
    corpus.prepare(str(tmp_path / "out"), ("austen", "kjv"), root=str(tmp_path))
  (tmp_path / debian_texts.KJV_PROGRAM).parent.mkdir(parents=True)
  (tmp_path / debian_texts.KJV_PROGRAM).write_text("")
  with pytest.raises(debian_texts.MissingPackageError, match=r"--no-install-recommends bible-kjv-text ;"):
    corpus.prepare(str(tmp_path / "out"), ("austen", "kjv"), root=str(tmp_path))
  with pytest.raises(debian_texts.MissingPackageError, match=r"--no-install-recommends bible-kjv-text perl-doc ;"):
    corpus.prepare(str(tmp_path / "out"), root=str(tmp_path))
  assert not (tmp_path / "out").exists()                       # nothing written before every source reads
  with pytest.raises(FileNotFoundError, match=r"python -m bmojo_jax.train.data.corpus prepare --out .*nowhere"):
    tasks.make_task(_lm_config(str(tmp_path / "nowhere")))


@pytest.mark.skipif(not os.path.exists("/" + debian_texts.KJV_PROGRAM) or not glob.glob("/" + debian_texts.PERL_PODS),
                    reason="bible-kjv or perl-doc not installed")
def test_installed_default_packages_read():
  kjv, perl = debian_texts.kjv_documents(), debian_texts.perl_documents()
  assert len(kjv) == 66 and "In the beginning God created the heaven and the earth." in kjv["kjv/genesis"]
  assert len(perl) > 150 and "perl/perlfunc" in perl
  assert sum(len(t.encode()) for t in (*kjv.values(), *perl.values())) > 8e6


@pytest.mark.skipif(not os.path.exists("/" + debian_texts.AUSTEN_DATA), reason="r-cran-janeaustenr not installed")
def test_installed_austen_package_reads():
  docs = debian_texts.austen_documents()
  assert len(docs) == 6 and "Emma Woodhouse, handsome, clever, and rich" in docs["austen/emma"]


# ------------------------------------------------------------------------------------------ perplexity
@pytest.fixture(scope="module")
def tiny_lm():
  return LanguageModel(tiny_config("bmojo", vocab_size=259), rngs=nnx.Rngs(0))


DOCS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife.",
        "In the beginning God created the heaven and the earth. And the earth was without form.",
        "short"]


def test_perplexity_is_exp_mean_nll_of_windows(tiny_lm):
  tok, t = ByteTokenizer(), 8
  out = lm_eval.context_perplexity(tiny_lm, tok, DOCS, seq_len=t, factors=(1, 2, 4), batch_tokens=64)
  windows, source = lm_eval.document_windows(DOCS, tok, 4 * t)
  assert source == "documents" and out["eval_text"] == "documents" and out["eval_windows"] == len(windows) == 5
  assert windows[0][0] == tok.bos_id and windows[3][0] == tok.bos_id                 # each document from BOS
  graphdef, state = nnx.split(tiny_lm)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  for c in (8, 32):
    logits = forward(state, jnp.asarray(windows[:, :c]))                             # windows of c tokens alone
    nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(windows[:, 1:c + 1])))
    np.testing.assert_allclose(out["eval"][str(c)], np.exp(nll.mean()), rtol=1e-5)
    np.testing.assert_allclose(out["eval_last"][str(c)], np.exp(nll[:, c - t:].mean()), rtol=1e-5)
    np.testing.assert_allclose(out["bits_per_token"][str(c)], nll.mean() / np.log(2), rtol=1e-5)
  # No document long enough: the held-out text is concatenated, and says so.
  _, source = lm_eval.document_windows(DOCS, tok, 150)
  assert source == "concatenated"
  with pytest.raises(ValueError, match="shorter than one window"):
    lm_eval.document_windows(DOCS, tok, 4000)


def _stream_of(texts: dict[str, str], folder, out) -> str:
  """`texts` written as files into `folder` and prepared by bmojo-prepare (byte tokenizer) into the stream `out`."""
  folder.mkdir(exist_ok=True)
  for name, text in texts.items():
    (folder / name).write_text(text, encoding="utf-8")
  prepare.prepare(sources.TextFileDocuments(str(folder)), str(out), ByteTokenizer(), workers=1, docs_per_shard=2,
                  progress_bar=False)
  return str(out)


def test_a_streams_documents_give_the_windows_of_their_text(tiny_lm, tmp_path):
  """A stream's documents (token ids, read where a window is kept) cut into the windows their text gives, whole
  documents and concatenated, so perplexity on a prepared stream is perplexity on its text."""
  texts = {"a.txt": DOCS[0], "b.txt": DOCS[1], "c.txt": DOCS[2]}
  docs = stream.StreamDocuments(_stream_of(texts, tmp_path / "texts", tmp_path / "stream"))
  assert len(docs) == 3 and [ByteTokenizer().decode(d) for d in docs] == DOCS        # BOS and EOS removed
  assert list(docs.sizes) == [len(d.encode()) for d in DOCS]
  tok = ByteTokenizer()
  for length, max_windows, source in ((32, None, "documents"), (8, 4, "documents"), (150, None, "concatenated")):
    windows, got = lm_eval.document_windows(docs, tok, length, max_windows)
    expected, want = lm_eval.document_windows(DOCS, tok, length, max_windows)
    assert got == want == source and windows.dtype == np.int32
    np.testing.assert_array_equal(windows, expected)
  assert (lm_eval.context_perplexity(tiny_lm, tok, docs, seq_len=8, factors=(1, 2), batch_tokens=64)
          == lm_eval.context_perplexity(tiny_lm, tok, DOCS, seq_len=8, factors=(1, 2), batch_tokens=64))


def test_documents_from_text_or_stream_and_its_refusals(tmp_path):
  config = _lm_config(str(tmp_path / "no-corpus"))                # another run's corpus need not exist
  texts = {"b.txt": DOCS[1], "a.txt": DOCS[0], "skip.dat": "not a text file by the run's patterns"}
  out = _stream_of(texts, tmp_path / "texts", tmp_path / "stream")
  docs, about, names = lm_eval.documents_from(config, ByteTokenizer(), text=str(tmp_path / "texts"))
  assert docs == [DOCS[0], DOCS[1]] and [os.path.basename(n) for n in names] == ["a.txt", "b.txt"]
  assert str(tmp_path / "texts") in about
  docs, about, names = lm_eval.documents_from(config, ByteTokenizer(), stream=out)
  assert [ByteTokenizer().decode(d) for d in docs] == [DOCS[0], DOCS[1]] and "token stream" in about
  refusals = [
      (dict(text=str(tmp_path / "nope")), r"Text path does not exist: .*/nope$"),
      (dict(text=str(tmp_path / "empty")), r"No files matching .* under directory: .*/empty$"),
      (dict(text=str(tmp_path / "blank")), r"No text under directory .*/blank: its 1 file\(s\)"),
      (dict(text=" , "), r"no text files or folders named"),
      (dict(stream=str(tmp_path / "nope")), r"Token stream directory does not exist: .*/nope\. Prepare it"),
      (dict(stream=str(tmp_path / "texts")), r"holds no finished token stream \(meta.json missing"),
      (dict(stream=str(tmp_path / "other")), r"was prepared with another tokenizer than the run's: kind "
                                              r"'sentencepiece' there vs 'byte' here, vocab_size 512 there vs 259"),
      (dict(text=str(tmp_path / "texts"), stream=out), r"not both"),
  ]
  (tmp_path / "empty").mkdir()
  (tmp_path / "blank").mkdir()
  (tmp_path / "blank" / "a.txt").write_text("")
  writer = stream.StreamWriter(str(tmp_path / "other"), 512)          # a SentencePiece stream of 512 ids
  writer.add(np.array([1, 40, 41, 2]), np.array([4]))
  writer.close({"kind": "sentencepiece", "vocab_size": 512, "bos_id": 1, "eos_id": 2, "pad_id": 0,
                "sha256": "0" * 64, "model_file": "/elsewhere/sp.model"}, "test")
  for kwargs, message in refusals:
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
      lm_eval.documents_from(config, ByteTokenizer(), **kwargs)
    assert "\n" not in str(err.value)


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


# ------------------------------------------------------------------------------------------------ NIAH
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


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """(workdir, corpus folder) of a smoke B'MOJO trained 2 steps (T = 16) on the fake package tree's corpus."""
  from bmojo_jax.train import trainer  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("lm_run")
  write_austen(tmp / "root", {"emma": EMMA, "northangerabbey": NORTHANGER})
  write_bible(tmp / "root")
  out = tmp / "corpus"
  corpus.prepare(str(out), ("austen", "kjv"), root=str(tmp / "root"), eval_fraction=0.3)   # the fake tree's sources
  config = _lm_config(str(out))
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


@pytest.mark.slow
def test_bmojo_eval_on_a_text_folder_and_on_a_prepared_stream(trained_run, tmp_path, monkeypatch):
  """`bmojo-eval --lm_lengths --niah` with --lm_text (a folder of text files) and --lm_stream (the same files
  prepared by bmojo-prepare): both score those documents, not the run's corpus, and agree; bad paths are refused
  in one line."""
  from tests.test_cli_inputs import run_script  # pylint: disable=g-import-not-at-top
  workdir, corpus_dir = trained_run
  texts = {"a.txt": (DOCS[0] + " ") * 4, "b.txt": (DOCS[1] + " ") * 4, "c.txt": DOCS[2]}
  out = _stream_of(texts, tmp_path / "texts", tmp_path / "stream")
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
  writer = stream.StreamWriter(str(tmp_path / "other"), 512)
  writer.add(np.array([1, 40, 41, 2]), np.array([4]))
  writer.close({"kind": "sentencepiece", "vocab_size": 512, "bos_id": 1, "eos_id": 2, "pad_id": 0,
                "sha256": "0" * 64, "model_file": "/elsewhere/sp.model"}, "test")
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
