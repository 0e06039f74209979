"""The MQAR sweep's bookkeeping (benchmarks/studies/mqar_sweep): per-family attention, what makes two runs the same
run (resume), which records its figure summarizes, and `--gpus` (one worker process per GPU, each population
trained once). The populations themselves are tested in tests/test_population.py."""

import json

import pytest

from benchmarks.studies.mqar_sweep import cli, population, report, sweep
from benchmarks.studies.mqar_sweep.records import KEY_FIELDS, best_setting, load_records, population_folder


def _record(**fields) -> dict:
  base = {"family": "transformer", "variant": "", "d_model": 128, "N": 32, "L": 256, "window": None, "n_fading": 0,
          "n_eidetic": 0, "eidetic_per_chunk": 0, "store_policy": "", "selection": "", "dtype": "bfloat16",
          "attn_impl": "reference", "learning_rate": 1e-3, "seed": 0, "epochs": 8, "patience": 0,
          "test_accuracy": 0.5, "state_bytes": 1000}
  return {**base, **fields}


def test_families_carry_their_own_attention_and_the_equal_memory_hybrid_takes_the_hybrids():
  args = cli.parse_args(["--smoke", "--families", "transformer:cudnn,hybrid:cudnn,bmojo"])
  assert args.families == ["transformer", "hybrid", "bmojo"]
  impl = lambda family, variant="": (population.population_config(args, family, variant, 16, 4)
                                     .model.compute.attn_impl)
  assert impl("transformer") == "cudnn" and impl("hybrid", population.EQUAL_MEMORY) == "cudnn"
  assert impl("bmojo") == "reference"
  args = cli.parse_args(["--smoke", "--families", "bmojo:reference", "--attn-impl", "cudnn"])
  config = population.population_config(args, "hybrid", population.EQUAL_MEMORY, 16, 4)
  assert config.model.compute.attn_impl == "cudnn"


def test_runs_with_another_attention_are_other_runs_and_mamba_has_none(tmp_path):
  path = tmp_path / "sweep.json"
  old_mamba = _record(family="mamba", attn_impl="cudnn")     # written before attn_impl was a key field
  path.write_text(json.dumps([_record(), _record(attn_impl="cudnn"), _record(learning_rate=1.00000004e-3), old_mamba]))
  records = load_records([str(path)])
  assert len(records) == 3                                    # the repeated reference run is one run
  assert {r["attn_impl"] for r in records if r["family"] == "mamba"} == {""}


def test_best_setting_is_the_best_learning_rate_of_the_mean_over_seeds():
  records = [_record(learning_rate=lr, seed=seed, test_accuracy=acc)
             for lr, seed, acc in ((1e-3, 0, 1.0), (1e-3, 1, 0.0), (1e-2, 0, 0.7), (1e-2, 1, 0.6))]
  assert best_setting(records) == (pytest.approx(0.65), 1e-2, [0.7, 0.6])


def test_figure_keeps_the_protocol_and_draws_the_eidetic_sweep_apart(tmp_path):
  bmojo = dict(family="bmojo", window=32, n_fading=8, eidetic_per_chunk=16, store_policy="score",
               selection="innovation")
  records = [_record(), _record(dtype="float32"), _record(epochs=2), _record(n_eidetic=80, **bmojo),
             _record(n_eidetic=16, state_bytes=500, **bmojo)]
  out = tmp_path / "sweep.png"
  assert report.plot(records, str(out), "bfloat16", 8, 80) == str(out)
  assert out.exists() and (tmp_path / "sweep_me.png").exists()
  assert report.plot(records, str(tmp_path / "none.png"), "bfloat16", 64, 80) is None


@pytest.mark.slow
def test_gpus_train_each_population_once_and_merge_what_a_cut_run_left(tmp_path, capsys):
  """Two workers (CPU here: CUDA_VISIBLE_DEVICES does nothing) share three populations. A cut earlier run left a
  worker file with the Transformer's record and a stale claim on B'MOJO: the record is kept (not retrained),
  the claim does not stop B'MOJO from training."""
  out = tmp_path / "out"
  (out / "claims").mkdir(parents=True)
  (out / "claims" / "bmojo_d16_N4_score_innovation_bfloat16_2").touch()
  left = _record(d_model=16, N=4, L=32, learning_rate=1e-2, epochs=2, test_accuracy=0.123)
  (out / "mqar_sweep_cpu_smoke.worker1.json").write_text(json.dumps([left]))
  cli.main(["--smoke", "--families", "transformer,bmojo", "--lrs", "1e-2", "--out", str(out),
                   "--workdir", str(tmp_path / "runs"), "--gpus", "0,1"])
  trained = [line.split("]")[1].split(":")[0].strip() for line in capsys.readouterr().out.splitlines()
             if "best test accuracy" in line]
  assert sorted(trained) == ["bmojo d16 N4", "hybrid(equal_memory) d16 N4"]   # once each, over both workers
  records = load_records([str(out / "mqar_sweep_cpu_smoke.json")])
  assert sorted((r["family"], r["variant"]) for r in records) == [
      ("bmojo", ""), ("hybrid", "equal_memory"), ("transformer", "")]
  assert [r["test_accuracy"] for r in records if r["family"] == "transformer"] == [0.123]
  assert all(r["steps"] > 0 for r in records if r["family"] != "transformer")
  assert sorted(p.name for p in (out / "claims").iterdir()) == [
      "bmojo_d16_N4_score_innovation_bfloat16_2", "hybrid(equal_memory)_d16_N4___bfloat16_2"]
  assert not list(out.glob("*.worker*.json")) and (out / "mqar_sweep_cpu_smoke.png").exists()


def test_table_means_seeds_per_learning_rate_and_counts_a_rate_given_twice_as_one(tmp_path, capsys):
  """The table's cell is the figure's value: the best learning rate's mean over its runs (2.15443469e-3 and
  0.00215443 are one rate; cuDNN and reference runs pool), with the rate, the run count and their range."""
  records = [_record(learning_rate=2.15443469e-3, seed=1, test_accuracy=0.2, attn_impl="cudnn"),
             _record(learning_rate=0.00215443, seed=0, test_accuracy=1.0),
             _record(learning_rate=1e-2, seed=0, test_accuracy=0.5),
             _record(N=16, test_accuracy=0.9), _record(d_model=64, dtype="float32", test_accuracy=0.1)]
  assert best_setting(records[:3]) == (0.6, 0.00215443, [0.2, 1.0])
  text = report.table(records, "bfloat16", 8, 80)
  assert text.splitlines()[0] == "| model | d_model | state bytes | N 16 | N 32 |"
  assert text.splitlines()[2] == ("| transformer | 128 | 1k | 0.900 (0.001; 1 run) | "
                                  "0.600 (0.00215; 2 runs: 0.200–1.000) |")
  assert len(text.splitlines()) == 3                          # the fp32 run is not the protocol's
  bmojo = dict(family="bmojo", window=32, n_fading=8, n_eidetic=80, store_policy="score", selection="innovation")
  text = report.table([_record(eidetic_per_chunk=k, test_accuracy=k / 10, **bmojo) for k in (4, 8)],
                          "bfloat16", 8, 80)
  assert [line.split(" | ")[0] for line in text.splitlines()[2:]] == ["| bmojo, k_e 4", "| bmojo, k_e 8"]
  path = tmp_path / "sweep.json"
  path.write_text(json.dumps(records))
  cli.main(["--table", str(path)])
  assert "0.600 (0.00215; 2 runs" in capsys.readouterr().out and (tmp_path / "sweep.png").exists()
  with pytest.raises(SystemExit, match="no results file"):
    cli.main(["--table", str(tmp_path / "missing.json")])
  with pytest.raises(SystemExit, match="no records of bfloat16, 64 epochs"):
    cli.main(["--table", str(path), "--epochs", "64"])


def test_population_folders_differ_in_every_key_field_but_the_run_folders():
  """Two sweeps into one --workdir that differ in anything but learning rate and seed (the run folders' names)
  write different population folders: an M_e sweep does not overwrite the runs of the protocol's M_e."""
  base = _record(family="bmojo", window=32, n_fading=8, n_eidetic=80, eidetic_per_chunk=16, store_policy="score",
                 selection="innovation")
  folder = population_folder(base)
  assert folder == "bmojo_d128_N32_L256_w32_mf8_me80_ke16_score_innovation_reference_bfloat16_e8"
  for field in KEY_FIELDS:
    if field in ("learning_rate", "seed"):
      continue
    other = {**base, field: base[field] + 1 if isinstance(base[field], int) else f"{base[field]}x"}
    assert population_folder(other) != folder, field


def test_patience_records_are_other_runs_and_old_records_are_patience_0(tmp_path, capsys):
  """Records written before early stopping (no "patience") are the patience-0 runs; --table shows the records of
  --patience's protocol only, and a patience run's folder is its own."""
  old = {k: v for k, v in _record(test_accuracy=0.25).items() if k != "patience"}
  new = _record(patience=8, test_accuracy=0.75, best_step=40, val_accuracy=0.8)
  path = tmp_path / "sweep.json"
  path.write_text(json.dumps([old, new]))
  records = load_records([str(path)])
  assert [r["patience"] for r in records] == [0, 8]                 # two runs, the old one upgraded
  cli.main(["--table", str(path)])
  assert "0.250 (0.001; 1 run)" in capsys.readouterr().out
  cli.main(["--table", str(path), "--patience", "8"])
  assert "0.750 (0.001; 1 run)" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="no records of bfloat16, 8 epochs, patience 3"):
    cli.main(["--table", str(path), "--patience", "3"])
  assert population_folder(new) == population_folder(old) + "_p8"


def test_patience_and_selections_options_make_the_configs():
  args = cli.parse_args(["--smoke", "--patience", "4", "--min-delta", "0.01", "--num-val", "64", "--epochs", "32",
                         "--selections", "innovation,learned"])
  assert args.selections == ["innovation", "learned"]
  config = population.population_config(args, "bmojo", "", 16, 4)
  assert (config.train.patience, config.train.min_delta, config.data.num_val) == (4, 0.01, 64)
  steps_per_epoch = config.data.num_train // config.train.batch_size
  assert config.train.num_steps == 32 * steps_per_epoch              # --epochs: the cap
  base, _ = population.population_base(args, config, "bmojo", "", 16, 4)
  assert base["patience"] == 4
  off = cli.parse_args(["--smoke"])
  assert off.selections == ["innovation"] and off.patience == 0
  config = population.population_config(off, "bmojo", "", 16, 4)
  assert (config.train.patience, config.data.num_val) == (0, 0)      # off: no validation split
  # k_e = chunk (every token of a chunk competes) is a setting: chunk = window = 8 at --smoke.
  every = cli.parse_args(["--smoke", "--eidetic-per-chunk", "8"])
  cfg = population.population_base(every, population.population_config(every, "bmojo", "", 16, 4), "bmojo", "",
                                   16, 4)[1]
  assert cfg.eidetic_per_chunk == cfg.chunk_size == 8
  with pytest.raises(SystemExit):
    cli.parse_args(["--smoke", "--selections", "innovation,nope"])
  with pytest.raises(SystemExit):
    cli.parse_args(["--smoke", "--patience", "-1"])


def test_selections_train_one_bmojo_population_each_and_the_others_once(tmp_path, monkeypatch):
  trained = []

  def fake_train(args, config, cfg, base, runs, checked):
    trained.append((base["family"], base["variant"], base["selection"], config.model.selection))
    return [{**base, "learning_rate": r.learning_rate, "seed": r.seed, "test_accuracy": 0.5, "test_loss": 1.0,
             "state_bytes": 1000, "population_tokens_per_s": 1.0} for r in runs], 0.0

  monkeypatch.setattr(sweep, "train_population", fake_train)
  monkeypatch.setattr(sweep, "summarize", lambda *a: None)
  argv = ["--smoke", "--families", "transformer,bmojo", "--lrs", "1e-2", "--out", str(tmp_path),
          "--selections", "innovation,learned,input_norm"]
  sweep.sweep(cli.parse_args(argv))
  assert trained == [("transformer", "", "", "innovation"), ("bmojo", "", "innovation", "innovation"),
                     ("bmojo", "", "learned", "learned"), ("bmojo", "", "input_norm", "input_norm"),
                     ("hybrid", "equal_memory", "", "innovation")]
  trained.clear()
  sweep.sweep(cli.parse_args(argv))                                   # resumed: every run is recorded
  assert trained == []
