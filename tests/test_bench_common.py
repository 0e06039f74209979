"""The benchmarks' `--set section.field=value` overrides (benchmarks/common.py)."""

import ml_collections

from benchmarks.common import apply_overrides


def test_overrides_cast_to_the_fields_type():
  c = ml_collections.ConfigDict({"model": {"d_model": 64, "scan_layers": True, "dtype": "float32", "window": None},
                                 "optim": {"learning_rate": 1e-3}})
  apply_overrides(c, ["model.d_model=128", "model.scan_layers=false", "model.dtype=bfloat16", "model.window=32",
                      "optim.learning_rate=2e-3"])
  assert c.model.d_model == 128 and c.model.scan_layers is False and c.model.dtype == "bfloat16"
  assert c.model.window == 32 and c.optim.learning_rate == 2e-3
  apply_overrides(c, ["model.scan_layers=True"])
  assert c.model.scan_layers is True
