"""Perplexity against context on held-out documents: the windows cut from documents, texts or a prepared
stream, and the documents `bmojo-eval` reads (train/lm_eval.py)."""

import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bmojo_jax.train import lm_eval
from bmojo_jax.train.data import stream
from bmojo_jax.train.data.tokenizers import ByteTokenizer
from tests.lm_documents import DOCS, lm_config, stream_of, write_sentencepiece_stream


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

def test_a_streams_documents_give_the_windows_of_their_text(tiny_lm, tmp_path):
  """A stream's documents (token ids, read where a window is kept) cut into the windows their text gives, whole
  documents and concatenated, so perplexity on a prepared stream is perplexity on its text."""
  texts = {"a.txt": DOCS[0], "b.txt": DOCS[1], "c.txt": DOCS[2]}
  docs = stream.StreamDocuments(stream_of(texts, tmp_path / "texts", tmp_path / "stream"))
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
  config = lm_config(str(tmp_path / "no-corpus"))                # another run's corpus need not exist
  texts = {"b.txt": DOCS[1], "a.txt": DOCS[0], "skip.dat": "not a text file by the run's patterns"}
  out = stream_of(texts, tmp_path / "texts", tmp_path / "stream")
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
  write_sentencepiece_stream(tmp_path / "other")    # a SentencePiece stream of 512 ids
  for kwargs, message in refusals:
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
      lm_eval.documents_from(config, ByteTokenizer(), **kwargs)
    assert "\n" not in str(err.value)



def test_lm_study_skips_only_records_of_the_same_settings():
  """A study resumes per family, variant and --set overrides: a record of the plain study (no "overrides" field)
  never stands for a study trained with other settings, nor one of another variant."""
  from benchmarks.studies.lm_study import recorded
  records = [{"family": "bmojo", "variant": ""}, {"family": "bmojo", "variant": "", "overrides": ["a=1"]}]
  assert recorded(records, "bmojo", "", [])
  assert recorded(records, "bmojo", "", ["a=1"])
  assert not recorded(records, "bmojo", "", ["data.recall_fraction=0.5"])
  assert not recorded(records, "bmojo", "n_eidetic=256", [])
  assert not recorded(records, "hybrid", "", [])
