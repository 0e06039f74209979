"""benchmarks/studies/mqar_length.py: a trained MQAR run evaluated at longer L and with a larger eidetic store, through
the trainer's own setup and evaluation."""

import json

import numpy as np
import pytest

from benchmarks.studies import mqar_length
from tests.conftest import tiny_train_config
from bmojo_jax.train import runs, trainer


@pytest.mark.slow
def test_lengths_and_grown_stores_of_a_trained_run(tmp_path):
  config = tiny_train_config(num_steps=3)
  config.model.update(family="bmojo", window=8, chunk_size=8, n_fading=2, n_eidetic=8, eidetic_per_chunk=4)
  config.data.num_test = 64
  workdir = str(tmp_path / "run")
  trained = trainer.train(config, workdir)
  out = tmp_path / "length.json"
  records = mqar_length.main(["--workdir", workdir, "--lengths", "1,2", "--grow", "1,2", "--out", str(out)])

  assert [(r["L"], r["n_eidetic"]) for r in records] == [(32, 8), (32, 16), (64, 8), (64, 16)]
  assert json.loads(out.read_text()) == records and (tmp_path / "length_run.png").exists()
  assert all(0.0 <= r["accuracy"] <= 1.0 and r["examples"] == 64 and r["step"] == 3 for r in records)
  # At the trained length and store: what the training run itself reported for its final evaluation.
  np.testing.assert_allclose([records[0]["accuracy"], records[0]["loss"]],
                             [trained["test_accuracy"], trained["test_loss"]], rtol=1e-6)
  # Longer sequences put more values beyond the window of 8; the stores differ, so the losses do.
  assert records[2]["fraction_beyond_window"] > records[0]["fraction_beyond_window"]
  assert records[0]["loss"] != records[1]["loss"]


def test_refuses_a_run_that_is_not_mqar(tmp_path, capsys):
  config = tiny_train_config()
  config.data.kind = "text"
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / runs.CONFIG_FILE).write_text(config.to_json())
  with pytest.raises(SystemExit):
    mqar_length.main(["--workdir", str(workdir)])
  assert "this benchmark evaluates MQAR runs" in capsys.readouterr().err


def test_refuses_lengths_the_vocabulary_cannot_make(tmp_path, capsys):
  config = tiny_train_config()          # vocab 256 (configs/mqar.py), L 32: 8 x 32 = 256 is too long
  (tmp_path / runs.CONFIG_FILE).write_text(config.to_json())
  with pytest.raises(SystemExit):
    mqar_length.main(["--workdir", str(tmp_path), "--lengths", "1,8"])
  assert "cannot make sequences of [256] tokens" in capsys.readouterr().err

