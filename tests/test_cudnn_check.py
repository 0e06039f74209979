"""benchmarks/cudnn_attention_check.py runs end to end on the CPU (XLA's attention and the reference stand in
for cuDNN), so a GPU call is not spent finding a broken script."""

import jax.numpy as jnp

from benchmarks import cudnn_attention_check as check


def test_op_check_compares_with_the_reference():
  r = check.op_check(2, 64, 2, 16, jnp.bfloat16, 2.0, "xla")
  assert set(r) >= {"rel_err_o", "rel_err_dq", "rel_err_dk", "rel_err_dv"}
  assert all(0 < r[f"rel_err_{n}"] < 2e-2 for n in ("o", "dq", "dk", "dv"))   # bf16 rounding, not zero


def test_model_check_trains_both_and_compares_gradients():
  r = check.model_check(2, 1, 2e-3, 4, test_impl="reference")   # the same implementation twice: equal
  assert r["steps"] == 2 and len(r["loss"]["reference"]) == 2
  assert r["loss"]["reference"] == r["loss"]["cudnn"]
  assert [g["step"] for g in r["grads_at_reference_params"]] == [0, 1, 2]
  assert all(g["worst_leaves"][0][1] == 0.0 for g in r["grads_at_reference_params"])
