"""The causal conv + SiLU kernels (`pallas_kernels.causal_conv`) against their reference: values, the carried
state and every gradient, with a carried state, packed rows (reach) and a ragged last block, in Pallas'
interpreter on a CPU (on a GPU backend the compiled kernels); their lowering to Triton at the 1.4B training
shape; the choice of `compute.conv_impl` by backend."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmojo_jax.config import ConfigError, ConvImpl
from bmojo_jax.kernels import get_conv_fn, resolve_conv_impl
from bmojo_jax.pallas_kernels.causal_conv import BlockSizes, causal_conv_silu, causal_conv_silu_reference
from tests.test_train_sharding import run_on_8_devices

B, W = 2, 4


def inputs(t, e, dtype=jnp.float32, packed=False):
  k = jax.random.split(jax.random.key(t * 1000 + e), 5)
  x = jax.random.normal(k[0], (B, t, e), dtype)
  weight = (0.5 * jax.random.normal(k[1], (W, e))).astype(dtype)
  bias = (0.1 * jax.random.normal(k[2], (e,))).astype(dtype)
  state = jax.random.normal(k[3], (B, W - 1, e), dtype)
  # reach = the position within a document; row 0 continues the state for 9 tokens, row 1 from its start
  pos = jnp.stack([jnp.where(jnp.arange(t) < 9, W, jnp.arange(t) % 5), jnp.arange(t) % 7])
  return (x, weight, bias, state, pos if packed else None), jnp.cos(jnp.arange(B * t * e).reshape(B, t, e) * 0.37)


def loss_and_grads(fn, x, weight, bias, state, reach, gy):
  def loss(x, weight, bias, state):
    y, new_state = fn(x, weight, bias, state, reach)
    return jnp.vdot(y.astype(jnp.float32), gy), (y, new_state)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, weight, bias, state)


@pytest.mark.parametrize("t, e, block_t, block_e, bwd_blocks, packed", [
    (37, 64, 8, 32, 8, False),   # a ragged last block, two channel blocks, the state read by the first block
    (37, 64, 8, 32, 8, True),    # packed rows: taps cut at each document's start
    (37, 32, 4, 32, 3, True),    # backward programs of 3 blocks, the last program's third past the row
    (16, 32, 4, 32, 1, True),    # 4-token blocks: each backward also needs the 3 tokens after its block
    (5, 16, 32, 16, 8, False),   # one block longer than the row
])
def test_kernel_equals_reference_fp32(t, e, block_t, block_e, bwd_blocks, packed):
  args, gy = inputs(t, e, packed=packed)
  bs = BlockSizes(block_t=block_t, block_e=block_e, bwd_blocks=bwd_blocks)
  with jax.default_matmul_precision("highest"):
    (_, (y, st)), grads = loss_and_grads(lambda *a: causal_conv_silu(*a, block_sizes=bs), *args, gy)
    (_, (y_ref, st_ref)), grads_ref = loss_and_grads(causal_conv_silu_reference, *args, gy)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(st, st_ref)
  for name, g, g_ref in zip(("x", "weight", "bias", "state"), grads, grads_ref):
    scale = float(jnp.max(jnp.abs(g_ref)))
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6 * max(scale, 1.0), err_msg=f"gradient of {name}")
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in grads_ref)     # row 0 reads the state in every case


MESH_SCRIPT = textwrap.dedent("""
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from bmojo_jax.pallas_kernels.causal_conv import BlockSizes, causal_conv_silu, causal_conv_silu_reference
    from bmojo_jax.pallas_kernels.sharding import use_mesh
    from tests.test_causal_conv import inputs, loss_and_grads

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    (x, w, bias, state, reach), gy = inputs(21, 64, packed=True)
    x, state, reach, gy = (np.concatenate([a, a[::-1]]) for a in (x, state, reach, gy))    # 4 rows
    args = jax.device_put((x, w, bias, state, reach, gy), NamedSharding(mesh, P()))

    def kernel(*a):
      with use_mesh(mesh):
        return causal_conv_silu(*a, block_sizes=BlockSizes(block_t=8, block_e=16))
    text = jax.jit(lambda *a: kernel(*a)[0]).lower(*args[:5]).as_text()
    assert "manual_computation" in text or "shard_map" in text, "not run per shard"
    with jax.default_matmul_precision("highest"):
      (_, (y, _)), grads = loss_and_grads(kernel, *args)
      (_, (y_ref, _)), grads_ref = loss_and_grads(causal_conv_silu_reference, *args)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
      np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
    print("RESULT{}")
""")


def test_kernel_per_shard_under_a_mesh():
  """Under a 2x2x2 mesh (8 fake CPU devices, one subprocess) the kernels run per shard, rows over data x fsdp and
  channels over tensor; values and gradients (the weight's and bias's summed over the shards' rows) are the
  reference's."""
  assert run_on_8_devices(MESH_SCRIPT) == {}


def test_kernel_rounds_once_in_bf16():
  """bf16 inputs: the kernel's fp32 arithmetic rounded once is within half a bf16 step of the fp32 result (the
  reference, rounding each of its 9 steps in bf16, is further off)."""
  args, gy = inputs(40, 64, jnp.bfloat16, packed=True)
  y = causal_conv_silu(*args, block_sizes=BlockSizes(block_t=8, block_e=32))[0]
  exact = causal_conv_silu_reference(*(a.astype(jnp.float32) for a in args[:4]), args[4])[0]
  assert y.dtype == jnp.bfloat16
  err = jnp.abs(y.astype(jnp.float32) - exact)
  assert float(jnp.max(err / jnp.maximum(jnp.abs(exact), 1e-2))) <= 2.0 ** -8 * 1.01
  ref_err = jnp.abs(causal_conv_silu_reference(*args)[0].astype(jnp.float32) - exact)
  assert float(jnp.mean(err)) < float(jnp.mean(ref_err))


def test_kernels_lower_for_gpu():
  """Compiled (not the interpreter), at the 1.4B training shape (B8, T2048, E4096, bf16): one Triton call each way;
  the backward's weight and bias partials are its only fp32 outputs."""
  sds = jax.ShapeDtypeStruct
  x, w = sds((8, 2048, 4096), jnp.bfloat16), sds((W, 4096), jnp.float32)
  bias, state = sds((4096,), jnp.float32), sds((8, W - 1, 4096), jnp.bfloat16)

  def loss(x, w, bias, state):
    return causal_conv_silu(x, w, bias, state, interpret=False)[0].astype(jnp.float32).sum()
  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(x, w, bias, state).lower(
      lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "custom_call" in line and "triton" in line]
  assert len(calls) == 2, calls
  assert "causal_conv_silu_fwd" in text and "causal_conv_silu_bwd" in text


def test_shapes_are_checked():
  (x, w, bias, state, _), _ = inputs(8, 16)
  with pytest.raises(ValueError, match=r"state must be \[B=2, W-1=3, E=16\], got shape \(2, 2, 16\)"):
    causal_conv_silu(x, w, bias, state[:, 1:])
  with pytest.raises(ValueError, match=r"reach must be \[B=2, T=8\]"):
    causal_conv_silu(x, w, bias, state, jnp.zeros((2, 7), jnp.int32))
  with pytest.raises(ValueError, match=r"weight must be \[W >= 2, E=16\]"):
    causal_conv_silu(x, w[:, :8], bias, state)


@pytest.mark.parametrize("backend, auto", [("gpu", "pallas"), ("tpu", "reference"), ("cpu", "reference")])
def test_conv_impl_by_backend(monkeypatch, backend, auto):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert resolve_conv_impl("auto") == ConvImpl(auto)
  assert get_conv_fn("auto") is (causal_conv_silu if auto == "pallas" else causal_conv_silu_reference)
  assert get_conv_fn("reference") is causal_conv_silu_reference
  if backend == "tpu":
    with pytest.raises(ConfigError, match=r"conv_impl='pallas' needs a GPU or CPU, but the backend is 'tpu'"):
      get_conv_fn("pallas")
  else:
    assert get_conv_fn("pallas") is causal_conv_silu
