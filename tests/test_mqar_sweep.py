"""The MQAR sweep's bookkeeping (benchmarks/mqar_sweep.py): per-family attention, what makes two runs the same
run (resume), and which records its figure summarizes. No training here; the populations are tested in
tests/test_population.py."""

import json

from benchmarks import mqar_sweep


def _record(**fields) -> dict:
  base = {"family": "transformer", "variant": "", "d_model": 128, "N": 32, "L": 256, "window": None, "n_fading": 0,
          "n_eidetic": 0, "eidetic_per_chunk": 0, "store_policy": "", "selection": "", "dtype": "bfloat16",
          "attn_impl": "reference", "learning_rate": 1e-3, "seed": 0, "epochs": 8, "test_accuracy": 0.5,
          "state_bytes": 1000}
  return {**base, **fields}


def test_families_carry_their_own_attention_and_the_equal_memory_hybrid_takes_the_hybrids():
  args = mqar_sweep.parse_args(["--smoke", "--families", "transformer:cudnn,hybrid:cudnn,bmojo"])
  assert args.families == ["transformer", "hybrid", "bmojo"]
  impl = lambda family, variant="": mqar_sweep.population_config(args, family, variant, 16, 4).model.attn_impl
  assert impl("transformer") == "cudnn" and impl("hybrid", mqar_sweep.EQUAL_MEMORY) == "cudnn"
  assert impl("bmojo") == "reference"
  args = mqar_sweep.parse_args(["--smoke", "--families", "bmojo:reference", "--attn-impl", "cudnn"])
  assert mqar_sweep.population_config(args, "hybrid", mqar_sweep.EQUAL_MEMORY, 16, 4).model.attn_impl == "cudnn"


def test_runs_with_another_attention_are_other_runs_and_mamba_has_none(tmp_path):
  path = tmp_path / "sweep.json"
  old_mamba = _record(family="mamba", attn_impl="cudnn")     # written before attn_impl was a key field
  path.write_text(json.dumps([_record(), _record(attn_impl="cudnn"), _record(learning_rate=1.00000004e-3), old_mamba]))
  records = mqar_sweep.load_records([str(path)])
  assert len(records) == 3                                    # the repeated reference run is one run
  assert {r["attn_impl"] for r in records if r["family"] == "mamba"} == {""}


def test_best_accuracy_is_the_best_learning_rate_of_the_mean_over_seeds():
  records = [_record(learning_rate=lr, seed=seed, test_accuracy=acc)
             for lr, seed, acc in ((1e-3, 0, 1.0), (1e-3, 1, 0.0), (1e-2, 0, 0.7), (1e-2, 1, 0.6))]
  assert abs(mqar_sweep.best_accuracy(records) - 0.65) < 1e-12


def test_figure_keeps_the_protocol_and_draws_the_eidetic_sweep_apart(tmp_path):
  bmojo = dict(family="bmojo", window=32, n_fading=8, eidetic_per_chunk=16, store_policy="score",
               selection="innovation")
  records = [_record(), _record(dtype="float32"), _record(epochs=2), _record(n_eidetic=80, **bmojo),
             _record(n_eidetic=16, state_bytes=500, **bmojo)]
  out = tmp_path / "sweep.png"
  assert mqar_sweep.plot(records, str(out), "bfloat16", 8, 80) == str(out)
  assert out.exists() and (tmp_path / "sweep_me.png").exists()
  assert mqar_sweep.plot(records, str(tmp_path / "none.png"), "bfloat16", 64, 80) is None
