"""Shared fixtures: tiny configurations of every family, compiled once per test module."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from bmojo_jax import Family, ModelConfig  # noqa: E402

FAMILIES = [f.value for f in Family]


def tiny_config(family: str, **overrides) -> ModelConfig:
  """A 1-block model small enough to compile in seconds: window 8, chunk 4, M_f 2, M_e 4 (k_e 2)."""
  kw = dict(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, window=8,
            chunk_size=4, n_fading=2, n_eidetic=4, eidetic_per_chunk=2, d_state=4, scan_chunk=8)
  if family == "transformer":
    kw.update(window=None)
  kw.update(overrides)
  return ModelConfig(**kw)


@pytest.fixture(params=FAMILIES)
def family(request):
  return request.param


@pytest.fixture(scope="module")
def module_compilation_cache(tmp_path_factory):
  """A persistent compilation cache for one module (its path): each train() builds fresh jitted closures, and
  subprocesses given JAX_COMPILATION_CACHE_DIR reuse what the module compiled. The old settings come back after."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield cache
  for n, v in old.items():
    jax.config.update(n, v)
