"""The benchmarks' shared helpers (benchmarks/common.py): `--set` overrides, list arguments, appended results."""

import json

import ml_collections

from benchmarks.common import append_results, apply_overrides, ints


def test_overrides_cast_to_the_fields_type():
  c = ml_collections.ConfigDict({"model": {"d_model": 64, "scan_layers": True, "dtype": "float32", "window": None},
                                 "optim": {"learning_rate": 1e-3}})
  apply_overrides(c, ["model.d_model=128", "model.scan_layers=false", "model.dtype=bfloat16", "model.window=32",
                      "optim.learning_rate=2e-3"])
  assert c.model.d_model == 128 and c.model.scan_layers is False and c.model.dtype == "bfloat16"
  assert c.model.window == 32 and c.optim.learning_rate == 2e-3
  apply_overrides(c, ["model.scan_layers=True"])
  assert c.model.scan_layers is True


def test_ints_and_append_results(tmp_path):
  assert ints("1,2, 4,") == [1, 2, 4]
  path = tmp_path / "new" / "r.json"
  assert append_results([{"a": 1}], str(path)) == str(path)
  append_results([{"a": 2}], str(path))
  assert json.loads(path.read_text()) == [{"a": 1}, {"a": 2}]
