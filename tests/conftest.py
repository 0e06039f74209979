"""Shared fixtures: tiny configurations of every family, compiled once per test module."""

import os
import shutil

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles hundreds of tiny programs and runs each a few times, so its time is XLA's compile time:
# - backend optimization level 0: LLVM's optimization passes off, the CPU compiles take about half as long (kernel
#   and model tests measured 34 -> 19 CPU-seconds);
# - XLA:CPU's legacy elemental fusion emitter instead of its MLIR fusion emitters (`xla_cpu_use_fusion_emitters`):
#   the MLIR pipeline costs more per fusion than the tiny programs save (test_chunked_prefill and test_inference's
#   inner loop 162 -> 82 s, one process).
# The programs are the same HLO; they run slower by what a tiny shape costs. Set before jax starts; subprocesses
# inherit them. An XLA_FLAGS that names either option keeps its value. The emitter option only where the tests run
# on the CPU (XLA aborts on a flag it does not know: jaxlib 0.10.2 has it; GPU runs of the suite do not need it).
_OPTIONS = [("xla_backend_optimization_level", "0")]
if os.environ["JAX_PLATFORMS"] == "cpu":
  _OPTIONS.append(("xla_cpu_use_fusion_emitters", "false"))
for _option, _value in _OPTIONS:
  if f"--{_option}" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_option}={_value}".strip()

import jax  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402
from flax import nnx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bmojo_jax import ComputeConfig, Family, LanguageModel, ModelConfig  # noqa: E402

# The tests compare fp32 results to fp32 rounding. On a GPU, XLA multiplies fp32 matrices in TF32 (10-bit mantissa)
# at the default precision, so a jnp reference drifts ~1e-3 from an exact kernel (measured on an H100: the decode
# attention's fp32 cases); there the whole suite runs at full fp32 precision. The CPU's dots are full fp32 anyway.
if os.environ["JAX_PLATFORMS"] != "cpu":
  jax.config.update("jax_default_matmul_precision", "highest")

FAMILIES = [f.value for f in Family]
# The families an invariant compiled once per family checks in the inner loop (-m "not slow"): B'MOJO holds every
# part of the others (Mamba, attention, memory) but the Transformer's MLP. CI checks every family.
INNER_FAMILIES = ("bmojo", "transformer")
FAMILY_TIERS = [f if f in INNER_FAMILIES else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


def tiny_config(family: str, compute: dict | None = None, **overrides) -> ModelConfig:
  """A 1-block model small enough to compile in seconds: window 8, chunk 4, M_f 2, M_e 4 (k_e 2), scan chunk 8;
  `overrides` change ModelConfig fields, `compute` ComputeConfig fields."""
  kw = dict(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, window=8,
            chunk_size=4, n_fading=2, n_eidetic=4, eidetic_per_chunk=2, d_state=4)
  if family == "transformer":
    kw.update(window=None)
  kw.update(overrides)
  return ModelConfig(**kw, compute=ComputeConfig(**{"scan_chunk": 8, **(compute or {})}))


def host_tokens(seed: int, shape: tuple[int, ...], vocab: int = 64) -> np.ndarray:
  """int32 token ids in [0, vocab), built on the host (numpy): test inputs without an eager XLA op (a compile) per
  shape. Jitted functions take them as they are; slice them with numpy."""
  return np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.int32)


def jaxpr_eqns(jaxpr, guards: tuple[str, ...] = (), guarded: bool = False):
  """(equation, guarded) for every equation of a jaxpr and of the jaxprs its equations call (scans, loops,
  conditionals, pjit, custom VJPs, checkpoints), in order; guarded: inside an equation whose primitive is in
  `guards` (e.g. ("cond", "while"): run on a device predicate)."""
  for eqn in jaxpr.eqns:
    yield eqn, guarded
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        while not hasattr(sub, "eqns") and hasattr(sub, "jaxpr"):               # ClosedJaxpr, or one wrapping it
          sub = sub.jaxpr
        if hasattr(sub, "eqns"):
          yield from jaxpr_eqns(sub, guards, guarded or eqn.primitive.name in guards)


def host_normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  """Standard normal fp32 inputs built on the host (numpy), as host_tokens."""
  return np.random.default_rng(seed).standard_normal(shape, np.float32)


@pytest.fixture(params=FAMILIES)
def family(request):
  return request.param


def _cache_settings(cache: str) -> dict:
  """jax's settings of a persistent compilation cache in `cache` that keeps every program (no minimum compile
  time or size)."""
  return {"jax_compilation_cache_dir": cache, "jax_persistent_cache_min_compile_time_secs": 0.0,
          "jax_persistent_cache_min_entry_size_bytes": 0}


def _persistent_cache(cache: str):
  """jax's persistent compilation cache in `cache` for every compile, then the old settings back. jax opens its
  cache once per process, at the first compile that finds a folder set, and keeps it: reset_cache() on the way in
  and out makes this folder the one used here (not an earlier module's) and no later module's."""
  settings = _cache_settings(cache)
  old = {n: getattr(jax.config, n) for n in settings}
  compilation_cache.reset_cache()
  for n, v in settings.items():
    jax.config.update(n, v)
  yield cache
  for n, v in old.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


def cache_env(cache: str) -> dict[str, str]:
  """The environment variables that give a child process the same cache settings (jax reads each option from its
  upper-case name): later children, and this process, read what it compiled."""
  return {n.upper(): str(v) for n, v in _cache_settings(cache).items()}


@pytest.fixture(scope="module")
def module_compilation_cache(tmp_path_factory):
  """A persistent compilation cache for one module (its path): each train() builds fresh jitted closures, and
  subprocesses given JAX_COMPILATION_CACHE_DIR reuse what the module compiled. The old settings come back after."""
  yield from _persistent_cache(str(tmp_path_factory.mktemp("jax_cache")))


@pytest.fixture(scope="session")
def _train_cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache_train"))


@pytest.fixture(scope="module")
def train_compilation_cache(_train_cache_dir):
  """module_compilation_cache, but one folder for every module that asks (the end-to-end training tests of
  tiny_train_config: test_faults_*, test_train_*): a program one of them compiled is read back by the others
  (and by their subprocesses) instead of compiled again."""
  yield from _persistent_cache(_train_cache_dir)


def tiny_train_config(num_steps: int = 8, **train):
  """configs/mqar.py's Mamba shrunk to compile in seconds: d_model 16, L 32, batch 4, a checkpoint every 3 steps,
  no evaluation; `train` overrides train fields."""
  from bmojo_jax.configs import mqar  # pylint: disable=g-import-not-at-top
  c = mqar.get_config("mamba")
  c.model.update(d_model=16, n_layers=2, d_state=4)
  c.model.compute.scan_chunk = 32
  c.data.update(seq_len=32, num_kv_pairs=4, num_train=256, num_test=12)
  c.train.update(num_steps=num_steps, batch_size=4, eval_batch_size=8, log_every=1, eval_every=0,
                 checkpoint_every=3, keep_checkpoints=10, progress_bar=False, plot=False,
                 async_checkpointing=False, target_accuracy=0.0)
  c.optim.warmup_steps = 2
  c.train.update(train)
  return c


@pytest.fixture(scope="module")
def tiny_lm():
  """A tiny B'MOJO over the byte tokenizer's 259 ids (tests/test_lm_eval.py, tests/test_lm_niah.py)."""
  return LanguageModel(tiny_config("bmojo", vocab_size=259), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """The uninterrupted run of tiny_train_config (8 steps, checkpoints 3, 6, 8), once per module: (workdir,
  results)."""
  from bmojo_jax.train import trainer  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("full"))
  return workdir, trainer.train(tiny_train_config(), workdir)


@pytest.fixture
def copied_run(full_run, tmp_path):
  """A private copy of full_run's workdir, for tests that damage or reuse it."""
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)
  return workdir


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted tiny_train_config run the fault tests compare against: (workdir, results)
  (tests/train_runs.py)."""
  from tests import train_runs  # pylint: disable=g-import-not-at-top
  return train_runs.reference_run(tmp_path_factory)
