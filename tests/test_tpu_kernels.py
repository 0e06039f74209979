"""The Mosaic-TPU kernels (`selective_scan` and `memory_attention` with backend="tpu") in Pallas' TPU interpreter
on CPU
against the references, forward and every gradient; `auto` and the explicit choices resolved per backend; one
whole-model train step with the TPU kernels equal to the reference model's. No TPU here: the kernels are only
ever run interpreted (docs/tpu.md). Bounds as the GPU kernels' tests (rel err ||a - b|| / ||b||: fp32 <= 1e-4,
bf16 <= 2e-2). The interpreter is slow: tiny shapes, one case per feature combination.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from bmojo_jax import LanguageModel, config as config_lib
from bmojo_jax.config import AttnImpl, ConfigError, ScanImpl
from bmojo_jax.kernels import (dot_product_attention, get_attention_fn, get_scan_fn, resolve_attn_impl,
                               resolve_scan_impl)
from bmojo_jax.pallas_kernels.selective_scan import ops as scan_gpu, selective_scan, tpu as scan_tpu
from bmojo_jax.pallas_kernels.selective_scan.reference import selective_scan_reference
from bmojo_jax.pallas_kernels.window_attention import memory_attention, ops as attn_gpu, tpu as attn_tpu
from bmojo_jax.pallas_kernels.window_attention.reference import memory_attention_reference
from tests.conftest import host_tokens, tiny_config

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_close(got, want, tol, what):
  for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, i, a.shape, b.shape, a.dtype, b.dtype)
    assert np.all(np.isfinite(np.asarray(a, np.float32))), (what, i)
    assert rel_err(a, b) <= tol, (what, i, rel_err(a, b))


def assert_matches_reference(loss, fast, reference, arrays, tol, what):
  """loss(fn, arrays) -> (scalar, outputs): fast's outputs and the gradient of every array equal reference's.
  Both compiled (one program each, not op-by-op dispatch of the interpreter and the reference)."""
  value_and_grad = lambda fn: jax.jit(jax.value_and_grad(lambda a: loss(fn, a), has_aux=True))
  (_, out), grads = value_and_grad(fast)(arrays)
  (_, want), want_grads = value_and_grad(reference)(arrays)
  assert_close(out, want, tol, what)
  for name in arrays:
    assert_close(grads[name], want_grads[name], tol, f"d{name}")


def weights(shape):
  """A fixed cotangent that weighs every output differently."""
  return jnp.cos(jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape) * 0.37)


# ---- `auto` and explicit choices per backend


@pytest.mark.parametrize("backend, scan, attn", [("gpu", "pallas", "pallas"), ("tpu", "pallas", "pallas"),
                                                ("cpu", "sequential", "reference")])
def test_auto_resolves_per_backend(monkeypatch, backend, scan, attn):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert resolve_scan_impl("auto") == ScanImpl(scan) and resolve_attn_impl("auto") == AttnImpl(attn)
  assert resolve_scan_impl(ScanImpl.AUTO, backend) == ScanImpl(scan)
  for impl in ("sequential", "associative", "pallas"):      # every scan runs everywhere (CPU: interpret)
    assert resolve_scan_impl(impl) == ScanImpl(impl)
  compute = config_lib.ModelConfig().compute
  assert compute.scan_impl == ScanImpl.AUTO and compute.attn_impl == AttnImpl.AUTO
  assert get_attention_fn("auto") is (memory_attention_reference if attn == "reference" else
                                      get_attention_fn("pallas"))
  assert (get_scan_fn("auto") is selective_scan_reference) == (scan == "sequential")


@pytest.mark.parametrize("backend", ["tpu", "cpu"])
def test_explicit_choice_the_backend_cannot_run_names_backend_and_choices(monkeypatch, backend):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  with pytest.raises(ConfigError, match=rf"attn_impl='cudnn' needs a GPU, but the backend is '{backend}'.*'reference'"):
    get_attention_fn("cudnn")
  assert resolve_attn_impl("cudnn", "gpu") == AttnImpl.CUDNN
  assert get_attention_fn("reference") is memory_attention_reference


def test_pallas_on_tpu_dispatches_to_the_tpu_kernels(monkeypatch):
  """On a TPU backend `pallas` (and `auto`) reach the TPU kernels (`selective_scan_tpu` / `memory_attention_tpu`),
  compiled, not the GPU ones; on a GPU backend the GPU ones, compiled."""
  calls = []
  record = lambda name: lambda *a, **k: calls.append((name, k["interpret"])) or name
  monkeypatch.setattr(scan_tpu, "selective_scan_tpu", record("scan tpu"))
  monkeypatch.setattr(attn_tpu, "memory_attention_tpu", record("attn tpu"))
  monkeypatch.setattr(scan_gpu, "selective_scan_gpu", record("scan gpu"))
  monkeypatch.setattr(attn_gpu, "memory_attention_gpu", record("attn gpu"))
  scan_args, _ = scan_inputs(jnp.float32)
  attn_args, _, _, _ = attn_inputs(jnp.float32, 1, 8, 1, 1, 8, 8, 0)
  for backend in ("tpu", "gpu"):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert get_scan_fn("auto")(**scan_args, reset=None) == f"scan {backend}"
    assert get_scan_fn("pallas")(**scan_args) == f"scan {backend}"
    assert get_attention_fn("auto")(**attn_args, window=8, chunk=8) == f"attn {backend}"
  assert calls == [(name, False) for name in ("scan tpu", "scan tpu", "attn tpu", "scan gpu", "scan gpu",
                                              "attn gpu")]       # compiled on a real TPU or GPU


def test_cudnn_stays_gpu_only_in_dot_product_attention(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="needs a GPU"):
    dot_product_attention(*(jnp.zeros((1, 8, 1, 8)),) * 3, window=None, chunk=8)


# ---- selective scan


def scan_inputs(dtype, b=1, t=21, e=6, n=4, groups=2, seed=0):
  """The scan's arrays and a reset [b, t], built on the host (numpy): no eager XLA op per shape and dtype."""
  rng = np.random.default_rng(seed)
  f32 = lambda shape: rng.standard_normal(shape, np.float32)
  nrm = lambda shape, s=1.0: (s * f32(shape)).astype(dtype)
  bc = (b, t, groups, n) if groups else (b, t, n)
  arrays = dict(u=nrm((b, t, e)), delta=nrm((b, t, e), 0.5), A=-np.exp(f32((e, n))),
                Bm=nrm(bc), Cm=nrm(bc), D=f32((e,)), z=nrm((b, t, e)),
                delta_bias=0.1 * f32((e,)), h0=f32((b, e, n)))
  reset = rng.random((b, t)) < 0.15
  reset[:, 9] = True                                                          # one reset inside chunk 1
  return arrays, reset


def check_scan(dtype, chunk, reset_on, softplus, **shape):
  arrays, reset = scan_inputs(dtype, **shape)
  reset = reset if reset_on else None

  def loss(fn, arrays):
    y, h = fn(**arrays, delta_softplus=softplus, reset=reset)
    return jnp.sum(y.astype(jnp.float32) * weights(y.shape)) + jnp.sum(h * weights(h.shape)), (y, h)

  tpu = lambda **a: selective_scan(**a, backend="tpu", tpu_chunk=chunk, interpret=True)
  assert_matches_reference(loss, tpu, selective_scan_reference, arrays, TOL[dtype], "scan outputs")


def test_scan_fp32_ragged_grouped_resets():
  """T = 21 over chunks of 8 (ragged), B/C in 2 groups (each padded to its own 128 lanes), D, z, delta_bias,
  h0 and segment resets; the forward and all nine gradients."""
  check_scan(jnp.float32, chunk=8, reset_on=True, softplus=True)


@pytest.mark.slow
def test_scan_bf16_ungrouped_no_softplus():
  check_scan(jnp.bfloat16, chunk=8, reset_on=False, softplus=False, b=2, t=19, e=5, groups=0)


# ---- memory attention


def attn_inputs(dtype, b, t, h, kh, p, chunk, m, seed=0):
  """The attention's arrays, memory validity, segment ids and memory spans, built on the host (numpy) as
  scan_inputs."""
  rng = np.random.default_rng(seed)
  n_chunks = -(-t // chunk)
  nrm = lambda shape: rng.standard_normal(shape, np.float32).astype(dtype)
  arrays = dict(q=nrm((b, t, h, p)), k=nrm((b, t, kh, p)), v=nrm((b, t, kh, p)))
  if m:
    arrays.update(mem_k=nrm((b, n_chunks, m, kh, p)), mem_v=nrm((b, n_chunks, m, kh, p)))
    valid = rng.random((b, n_chunks, m)) < 0.7
    valid[:, 0] = False                                                       # chunk 0: no memory
  else:
    valid = None
  segment_ids = np.cumsum(rng.random((b, t)) < 0.08, axis=1).astype(np.int32)
  lo = rng.integers(0, chunk // 2, (b, n_chunks, m))
  mem_span = np.stack([lo, lo + chunk // 2 + 1], axis=2).astype(np.int32) if m else None
  return arrays, valid, segment_ids, mem_span


def check_attention(dtype, *, window, packed, b=1, t=29, h=4, kh=2, p=16, chunk=8, m=3, block=128):
  arrays, valid, segment_ids, mem_span = attn_inputs(dtype, b, t, h, kh, p, chunk, m)
  kw = dict(window=window, chunk=chunk, segment_ids=segment_ids if packed else None,
            mem_span=mem_span if packed else None)

  def loss(fn, arrays):
    o = fn(**arrays, mem_valid=valid, **kw)
    return jnp.sum(o.astype(jnp.float32) * weights(o.shape)), o

  tpu = lambda **a: memory_attention(**a, backend="tpu", tpu_block=block, interpret=True)
  assert_matches_reference(loss, tpu, memory_attention_reference, arrays, TOL[dtype], "attention output")


def test_attention_fp32_window_memory_gqa_packed():
  """Window 32 = 2 chunks of 16 in blocks of 8 rows (a band of 5 key blocks; two query blocks share a chunk's
  memory), T = 37 (ragged), 4 query heads on 2 kv heads, 3 memory slots (padded to 8) with a validity mask,
  segment ids and memory spans; o and dq, dk, dv, dmem."""
  check_attention(jnp.float32, window=32, packed=True, t=37, chunk=16, block=8)


@pytest.mark.slow
def test_attention_bf16_causal_no_memory():
  check_attention(jnp.bfloat16, window=None, packed=False, b=2, t=21, h=2, kh=1, m=0)


def test_attention_rejects_a_chunk_the_sublanes_cannot_tile():
  arrays, _, _, _ = attn_inputs(jnp.float32, 1, 8, 1, 1, 8, 4, 0)
  with pytest.raises(ValueError, match="chunk=4 must be a multiple of 8"):
    memory_attention(**arrays, window=4, chunk=4, backend="tpu", interpret=True)


# ---- Mosaic lowering (no TPU: jax's Pallas -> Mosaic lowering only, not libtpu's compiler)


@pytest.mark.parametrize("chip", ["TPU v5 lite", "TPU v5p"])
def test_kernels_lower_for_tpu(monkeypatch, chip):
  """Forward and backward of both kernels at the full LM preset's tiles (bf16; scan chunk 16, 128-lane
  channel blocks; attention chunk 128, window 256, P 64, 72 memory slots, packed) lower to Mosaic for a TPU
  through `jax.export`: block shapes, grid specs and every primitive in the kernels have TPU lowerings."""
  from jax._src.pallas.mosaic import tpu_info   # the chip the lowering asks about; there is no TPU here
  monkeypatch.setattr(tpu_info, "get_device_kind", lambda: chip)
  monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
  arrays, reset = scan_inputs(jnp.bfloat16, b=1, t=40, e=160, n=16, groups=0)
  scan = lambda a: jax.grad(lambda a: jnp.sum(selective_scan(**a, reset=reset, backend="tpu", interpret=False)[0]
                                               .astype(jnp.float32)))(a)
  text = jax.export.export(jax.jit(scan), platforms=["tpu"])(arrays).mlir_module()
  assert text.count("selective_scan_tpu_") >= 2
  arrays, valid, segment_ids, mem_span = attn_inputs(jnp.bfloat16, 1, 300, 4, 2, 64, 128, 72)
  attend = lambda a: jax.grad(lambda a: jnp.sum(memory_attention(
      **a, mem_valid=valid, window=256, chunk=128, segment_ids=segment_ids, mem_span=mem_span, backend="tpu",
      interpret=False).astype(jnp.float32)))(a)
  text = jax.export.export(jax.jit(attend), platforms=["tpu"])(arrays).mlir_module()
  assert text.count("memory_attention_tpu_") >= 4


# ---- one train step of the whole model


@pytest.mark.slow
def test_model_train_step_on_tpu_kernels_equals_reference(monkeypatch):
  """B'MOJO (Mamba + window attention + fading and eidetic memory) with scan_impl = attn_impl = "auto" on a
  backend reported as TPU, the kernels in the TPU interpreter: the loss and every parameter gradient equal
  the reference model's (sequential scan, reference attention)."""
  tokens = host_tokens(0, (1, 17))                                  # 16 inputs: 2 chunks of 8

  def loss_and_grads(cfg):
    def loss_fn(model):
      logits = model(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    with jax.default_matmul_precision("highest"):
      loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(LanguageModel(cfg, rngs=nnx.Rngs(0)))
    return float(loss), nnx.to_pure_dict(grads)

  sizes = dict(chunk_size=8, window=8, init_std=0.1)
  want_loss, want = loss_and_grads(tiny_config("bmojo", **sizes,
                                               compute=dict(scan_impl="sequential", attn_impl="reference")))
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pltpu.force_tpu_interpret_mode():
    loss, got = loss_and_grads(tiny_config("bmojo", **sizes))
  assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
  want_leaves = jax.tree.leaves_with_path(want)
  assert jax.tree.structure(got) == jax.tree.structure(want) and want_leaves
  for (path, w), g in zip(want_leaves, jax.tree.leaves(got)):
    scale = float(np.max(np.abs(w)))
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
