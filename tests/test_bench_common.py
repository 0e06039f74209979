"""The benchmarks' shared helpers (benchmarks/common.py): `--set` overrides, list arguments, appended results,
results files that a write cut short leaves whole."""

import json
import os

import ml_collections
import pytest

from benchmarks.common import append_results, apply_overrides, ints, write_json


def test_overrides_cast_to_the_fields_type():
  c = ml_collections.ConfigDict({"model": {"d_model": 64, "compute": {"scan_layers": True, "dtype": "float32"},
                                           "window": None},
                                 "optim": {"learning_rate": 1e-3}})
  apply_overrides(c, ["model.d_model=128", "model.compute.scan_layers=false", "model.compute.dtype=bfloat16",
                      "model.window=32", "optim.learning_rate=2e-3"])
  assert c.model.d_model == 128 and c.model.compute.scan_layers is False and c.model.compute.dtype == "bfloat16"
  assert c.model.window == 32 and c.optim.learning_rate == 2e-3
  apply_overrides(c, ["model.compute.scan_layers=True"])
  assert c.model.compute.scan_layers is True


def test_ints_and_append_results(tmp_path):
  assert ints("1,2, 4,") == [1, 2, 4]
  path = tmp_path / "new" / "r.json"
  assert append_results([{"a": 1}], str(path)) == str(path)
  append_results([{"a": 2}], str(path))
  assert json.loads(path.read_text()) == [{"a": 1}, {"a": 2}]


def test_a_write_that_fails_midway_leaves_the_previous_results_whole(tmp_path):
  path = str(tmp_path / "r.json")
  write_json(path, [{"a": 1}])
  with pytest.raises(TypeError):   # json.dump fails after it has written part of the list
    write_json(path, [{"a": 2}, {"b": object()}])
  assert json.loads(open(path).read()) == [{"a": 1}] and os.listdir(tmp_path) == ["r.json"]
  append_results([{"a": 3}], path)
  assert json.loads(open(path).read()) == [{"a": 1}, {"a": 3}]
