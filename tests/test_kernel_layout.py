"""Projection kernels in either layout (`KernelLayout`): the out_in model computes the in_out one's logits, in the
parallel pass and decoding; `to_kernel_layout` round-trips exactly; a decoder decodes the same tokens in both."""

import jax
import numpy as np
import pytest
from flax import nnx

from bmojo_jax import ComputeConfig, ConfigError, KernelLayout, LanguageModel, to_kernel_layout
from bmojo_jax import inference
from bmojo_jax.inference import Decoder
from bmojo_jax.layers import Projection
from tests.conftest import FAMILIES, INNER_FAMILIES, host_tokens, tiny_config

T = 21               # > 2 windows of 8: the ring wraps, the memory chunks (4) turn over
PREFILL = 7          # mid-chunk
forward = nnx.jit(lambda m, x: m(x))


def pure(model):
  return nnx.to_pure_dict(nnx.state(model))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


# batch 1 and, for the memory attention, batch 2: a decode step of one row and of several.
CASES = [(f, 1) if f in INNER_FAMILIES else pytest.param(f, 1, marks=pytest.mark.slow) for f in FAMILIES] + [
    ("bmojo", 2), pytest.param("bmojo_f", 2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("family,batch", CASES)
def test_out_in_computes_the_in_out_logits(family, batch):
  model = LanguageModel(tiny_config(family, init_std=0.1), rngs=nnx.Rngs(0))
  tokens = host_tokens(1, (batch, T))
  full = np.asarray(forward(model, tokens))
  assert float(np.abs(full).max()) > 0.5               # logits are not near-constant: the checks have teeth
  np.testing.assert_allclose(np.asarray(forward(to_kernel_layout(model, "out_in"), tokens)), full, atol=1e-5)

  decoders = {layout: Decoder(model, kernel_layout=layout) for layout in KernelLayout}
  out_in = decoders[KernelLayout.OUT_IN]
  assert out_in.kernel_layout == KernelLayout.OUT_IN and out_in.cfg.compute.kernel_layout == KernelLayout.OUT_IN
  logits, cache = out_in.prefill(tokens[:, :PREFILL], T)
  np.testing.assert_allclose(np.asarray(logits), full[:, :PREFILL], atol=1e-4)
  for t in range(PREFILL, T):                          # decode == forward, step by step, in out_in
    step_logits, cache = out_in.step(tokens[:, t], cache)
    np.testing.assert_allclose(np.asarray(step_logits), full[:, t], atol=1e-4, err_msg=f"position {t}")

  loops = {}                                           # the on-device loop: the same greedy tokens
  for layout, decoder in decoders.items():
    logits, cache = decoder.prefill(tokens[:, :PREFILL], T, last_only=True)
    loops[layout] = decoder.decode(logits[:, -1], cache, T - PREFILL)
  (tok_a, logits_a, _), (tok_b, logits_b, _) = loops.values()
  np.testing.assert_array_equal(np.asarray(tok_a), np.asarray(tok_b))
  np.testing.assert_allclose(np.asarray(logits_a), np.asarray(logits_b), atol=1e-4)


@pytest.mark.parametrize("family", ["bmojo", "transformer"])   # every kind of projection: Mamba, attention, MLP
@pytest.mark.parametrize("scan_layers", [False, True])
def test_conversion_round_trips_exactly(family, scan_layers):
  cfg = tiny_config(family, compute=dict(scan_layers=scan_layers), n_layers=4)
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  assert to_kernel_layout(model, "in_out") is model
  out_in = to_kernel_layout(model, KernelLayout.OUT_IN)
  assert out_in.cfg == cfg.with_compute(kernel_layout="out_in")
  assert_trees_equal(pure(to_kernel_layout(out_in, "in_out")), pure(model))
  # One seed, one map: a model built in out_in holds the converted kernels.
  assert_trees_equal(pure(LanguageModel(out_in.cfg, rngs=nnx.Rngs(0))), pure(out_in))

  lead = (cfg.n_blocks,) if scan_layers else ()
  block = (lambda tree: tree["blocks"]) if scan_layers else (lambda tree: tree["blocks"][0])
  shapes = block(jax.tree.map(lambda x: x.shape, pure(out_in)))
  specs = block(nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(out_in))))
  d, h, k, p = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
  layers = ("layers",) if scan_layers else ()
  attn = "mixer2" if family == "bmojo" else "mixer1"
  assert shapes[attn]["wq"]["kernel"] == (*lead, h, p, d)
  assert shapes[attn]["wk"]["kernel"] == (*lead, k, p, d)
  assert shapes[attn]["wo"]["kernel"] == (*lead, d, h, p)
  assert tuple(specs[attn]["wq"]["kernel"]) == (*layers, "heads", "head_dim", "embed")
  assert tuple(specs[attn]["wo"]["kernel"]) == (*layers, "embed", "heads", "head_dim")
  if family == "bmojo":
    e, n, r = cfg.d_inner, cfg.d_state, cfg.rank
    assert shapes["mixer1"]["in_proj"]["kernel"] == (*lead, 2, e, d)
    assert tuple(specs["mixer1"]["in_proj"]["kernel"]) == (*layers, None, "inner", "embed")
    assert shapes["mixer1"]["x_proj"]["kernel"] == (*lead, r + 2 * n, e)
    assert shapes["mixer1"]["dt_proj"]["kernel"] == (*lead, e, r)
    assert shapes["mixer1"]["out_proj"]["kernel"] == (*lead, d, e)
  else:
    assert shapes["mixer2"]["up"]["kernel"] == (*lead, cfg.ff_size, d)
    assert shapes["mixer2"]["down"]["kernel"] == (*lead, d, cfg.ff_size)


def test_scan_prefill_reads_the_converted_weights():
  """scan_prefill's stacked copy is made from the out_in state: its prefill gives the loop's logits and cache."""
  model = LanguageModel(tiny_config("bmojo", init_std=0.1, n_layers=4), rngs=nnx.Rngs(1))
  tokens = host_tokens(2, (1, 10))
  scanned = Decoder(model, scan_prefill=True, kernel_layout="out_in")
  assert scanned.prefill_graphdef is not scanned.graphdef
  assert np.shape(scanned.prefill_state["blocks"]["mixer2"]["wo"]["kernel"][...]) == (2, 32, 4, 8)
  logits, cache = scanned.prefill(tokens, T)
  ref_logits, ref_cache = Decoder(model, kernel_layout="out_in").prefill(tokens, T)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
  for x, y in zip(jax.tree.leaves(cache), jax.tree.leaves(ref_cache)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=1e-5)


def test_bad_layout_is_a_config_error():
  with pytest.raises(ConfigError, match="compute.kernel_layout='rows'"):
    ComputeConfig(kernel_layout="rows")
  model = LanguageModel(tiny_config("transformer"), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="compute.kernel_layout='columns'"):
    to_kernel_layout(model, "columns")
  with pytest.raises(ConfigError, match="compute.kernel_layout='columns'"):
    Decoder(model, kernel_layout="columns")
  with pytest.raises(ValueError, match="contracted dims, then the output dims"):
    Projection("BTD,HPD->BTHP", (4, 2, 8), ("embed", "heads", "head_dim"), tiny_config("transformer"),
               nnx.Rngs(0), jax.nn.initializers.zeros)


def test_default_layout_by_backend():
  """out_in on a GPU (measured there), the training layout elsewhere; a Decoder given none takes it."""
  expected = KernelLayout.OUT_IN if jax.default_backend() == "gpu" else KernelLayout.IN_OUT
  assert inference.default_kernel_layout() == expected
  model = LanguageModel(tiny_config("mamba"), rngs=nnx.Rngs(0))
  assert Decoder(model).kernel_layout == expected
