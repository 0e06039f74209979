"""benchmarks/checks/cudnn_attention_check.py: its comparisons find what they are for, on the CPU, so a GPU call is not
spent finding a broken script; and on a GPU, cuDNN against the reference.

On a CPU cuDNN cannot run, and the script's model check there compares the reference with itself (equal by
construction: a test that cannot fail, and at the script's size 3 minutes of the suite). So the CPU tests run
the script's two comparisons on a real difference: XLA's attention against the reference (the op check), a
planted wrong attention (it must be reported), and the model check at a tiny size with a planted different
implementation (it must report the difference, and zero for the reference against itself). The model check
against cuDNN at the script's size is `test_model_check_cudnn_on_gpu`, skipped without a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.checks import cudnn_attention_check as check
from benchmarks.studies.mqar_sweep import cli, population


def test_op_check_compares_with_the_reference():
  r = check.op_check(2, 64, 2, 16, jnp.bfloat16, 2.0, "xla")
  assert set(r) >= {"rel_err_o", "rel_err_dq", "rel_err_dk", "rel_err_dv"}
  assert all(0 < r[f"rel_err_{n}"] < 2e-2 for n in ("o", "dq", "dk", "dv"))   # bf16 rounding, not zero


def test_op_check_reports_a_wrong_attention(monkeypatch):
  """An attention that lets each query see one future key (a wrong causal mask) is reported: every error is
  far above the bf16 rounding the real implementations show."""
  real = check.dot_product_attention

  def leaky(q, k, v, **kw):
    shifted = lambda x: jnp.concatenate([x[:, 1:], x[:, -1:]], axis=1)   # query t sees key t + 1
    return real(q, shifted(k), shifted(v), **kw)

  monkeypatch.setattr(check, "dot_product_attention", leaky)
  r = check.op_check(2, 64, 2, 16, jnp.bfloat16, 2.0, "xla")
  assert all(r[f"rel_err_{n}"] > 0.1 for n in ("o", "dq", "dk", "dv")), r


def test_max_rel_err_finds_one_wrong_row():
  want = np.ones((64, 8), np.float32)
  got = want.copy()
  got[17] += 0.5                            # one wrong row among 64: a norm over all rows would say 0.06
  assert check.max_rel_err(got, want) == pytest.approx(0.5)
  assert check.max_rel_err(want, want) == 0.0


@pytest.fixture
def tiny_model_check(monkeypatch, module_compilation_cache):
  """model_check on the sweep's smoke sizes (d_model 16, N 4, L 32, 64 examples). attn_impl 'planted' builds
  the reference attention in fp32 where the reference side is bf16: another implementation of one function.
  The persistent compilation cache compiles each distinct program once: the reference side's are the same
  programs in both tests, and twice the same in the test of one implementation."""
  del module_compilation_cache
  real = population.population_config

  def population_config(args, family, variant, d_model, n):
    planted = args.attn_impl == "planted"
    small = cli.parse_args(["--smoke", "--seq-len", "32", "--families", family])
    config = real(small, family, variant, 16, 4)
    config.model.compute.dtype = "float32" if planted else args.dtype
    return config

  monkeypatch.setattr(population, "population_config", population_config)
  return check.model_check


@pytest.mark.slow   # two trainer setups (MQAR data, model, optimizer): the script end to end
def test_model_check_reports_a_planted_difference(tiny_model_check):
  r = tiny_model_check(1, 1, 2e-3, 4, test_impl="planted")
  assert r["steps"] == 1 and [g["step"] for g in r["grads_at_reference_params"]] == [0, 1]
  assert len(r["loss"]["reference"]) == len(r["loss"]["cudnn"]) == 1
  for g in r["grads_at_reference_params"]:
    assert np.isfinite(g["loss_ref"]) and np.isfinite(g["loss_cudnn_same_params"])
    assert g["loss_ref"] != g["loss_cudnn_same_params"]               # bf16 against fp32: seen
    assert 0 < g["worst_leaves"][0][1] < 0.5, g["worst_leaves"]        # and of the size of bf16 rounding


@pytest.mark.slow   # two trainer setups (MQAR data, model, optimizer): the script end to end
def test_model_check_of_one_implementation_reports_zero(tiny_model_check):
  r = tiny_model_check(1, 1, 2e-3, 4, test_impl="reference")
  assert r["loss"]["reference"] == r["loss"]["cudnn"]
  assert all(g["worst_leaves"][0][1] == 0.0 for g in r["grads_at_reference_params"])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU (the CPU tests above "
                    "check the comparisons themselves)")
def test_model_check_cudnn_on_gpu():
  """The script's model (d_model 128, N 32, bf16) two steps with cuDNN against the reference: finite, and the
  gradients at the same parameters within bf16 rounding (a wrong mask gives errors of order 1)."""
  r = check.model_check(2, 1, 2e-3, 4)
  assert r["steps"] == 2 and len(r["loss"]["cudnn"]) == 2
  for g in r["grads_at_reference_params"]:
    assert abs(g["loss_ref"] - g["loss_cudnn_same_params"]) <= 2e-2 * abs(g["loss_ref"]), g
    assert g["worst_leaves"][0][1] < 0.1, g["worst_leaves"]
