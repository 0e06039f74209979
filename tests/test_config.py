"""Configs: impossible ones fail naming the field; preset and per-sublayer parameter counts match the closed
form; every sublayer kind has a mixer; the shape legend holds every einsum letter and logical axis name."""

import pathlib
import re

import jax
import pytest
from flax import nnx

from bmojo_jax import (ConfigError, Family, LanguageModel, ModelConfig, PRESET_NAMES, Sublayer, count_params,
                       preset)
from bmojo_jax import typing as tp
from bmojo_jax.model import MIXERS, Mixer
from bmojo_jax.param_count import SUBLAYER_PARAMS
from tests.conftest import FAMILIES, tiny_config


@pytest.mark.parametrize("overrides, needle", [
    (dict(n_heads=3), "n_heads=3 does not divide d_model=32"),
    (dict(chunk_size=3), "chunk_size=3 must divide window=8"),
    (dict(n_eidetic=5), "n_eidetic=5 must be a multiple of eidetic_per_chunk=2 with store_policy='fifo'"),
    (dict(selection="linear", predictor_loss_weight=-1.0), "predictor_loss_weight=-1.0 must be"),
    (dict(n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
    (dict(n_fading=5), "n_fading=5 must be in 1..chunk_size=4"),
    (dict(window=None), "window=None"),
    (dict(n_layers=3), "n_layers=3 must be even"),
    (dict(compute=dict(dtype="float33")), "compute.dtype='float33' is not a dtype"),
    (dict(compute=dict(scan_impl="magic")), "compute.scan_impl='magic' is unknown"),
    (dict(compute=dict(scan_chunk=0)), "compute.scan_chunk=0 must be positive"),
    (dict(selection="oracle"), "selection='oracle' is unknown"),
])
def test_impossible_configs_name_the_field(overrides, needle):
  with pytest.raises(ConfigError) as err:
    tiny_config("bmojo", **overrides)
  assert needle in str(err.value)


def test_unknown_family():
  with pytest.raises(ConfigError, match="family='retnet' is unknown"):
    ModelConfig(family="retnet")


def test_unknown_preset():
  with pytest.raises(ConfigError, match="family 'gpt' is unknown"):
    preset("gpt-130m")
  with pytest.raises(ConfigError, match="size='9b' is unknown"):
    preset("mamba-9b")


def test_family_selects_memory():
  assert tiny_config("hybrid").fading == 0 and tiny_config("hybrid").eidetic == 0
  assert tiny_config("bmojo_f").fading == 2 and tiny_config("bmojo_f").eidetic == 0
  assert tiny_config("bmojo").fading == 2 and tiny_config("bmojo").eidetic == 4


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_parameter_counts(name):
  """Traced with scanned blocks (one block traced, not up to 48: 0.05 s against 2.4 s a preset); the block loop
  holds the same parameters (tests/test_model.py: stack_blocks), and is traced here at the small presets."""
  cfg = preset(name)
  for layout in ([False, True] if cfg.n_layers <= 8 else [True]):
    abstract = nnx.eval_shape(lambda: LanguageModel(cfg.with_compute(scan_layers=layout), rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == count_params(cfg), (name, layout)


@pytest.mark.parametrize("kind", list(Sublayer))
def test_every_sublayer_kind_has_a_mixer_and_a_parameter_count(kind):
  """Each kind's class follows the mixer protocol and holds the parameters its closed form counts, in every
  family that uses it (paper size and tiny: grouped-query heads, own dt_rank)."""
  assert set(MIXERS) == set(SUBLAYER_PARAMS) == set(Sublayer)
  cfgs = [c for f in FAMILIES for c in (preset(f"{f}-130m"), tiny_config(f, dt_rank=3),
                                        tiny_config(f, selection="learned")) if kind in c.sublayers]
  assert cfgs
  for cfg in cfgs:
    mixer = nnx.eval_shape(lambda: MIXERS[kind](cfg, rngs=nnx.Rngs(0)))
    assert isinstance(mixer, Mixer)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(mixer, nnx.Param)))
    assert n == SUBLAYER_PARAMS[kind](cfg), (cfg.family, kind)


def test_selection_only_matters_with_eidetic_memory():
  """Like store_policy, `selection` is ignored by the families without an eidetic store: the learned scorer
  exists (and is counted) only in B'MOJO."""
  for family in FAMILIES:
    cfg = tiny_config(family, selection="learned")
    assert cfg.learned_selection == (family == "bmojo")
    extra = count_params(cfg) - count_params(tiny_config(family))
    assert extra == (cfg.n_blocks * cfg.d_model if family == "bmojo" else 0), family


def test_fading_source_is_the_memory_families_mamba_into_attention():
  for family in Family:
    cfg = tiny_config(family.value)
    assert cfg.fading_source == (family in (Family.BMOJO_F, Family.BMOJO))
    if cfg.fading_source:
      assert cfg.sublayers == (Sublayer.MAMBA, Sublayer.ATTENTION)


def test_mamba_paper_sizes():
  # The Mamba paper's names for its models: 130M, 370M, 790M, 1.4B.
  got = [count_params(preset(f"mamba-{s}")) / 1e6 for s in ("130m", "370m", "790m", "1.4b")]
  for n, want in zip(got, (130, 370, 790, 1400)):
    assert abs(n - want) / want < 0.03, got


def test_parameters_carry_logical_axes():
  model = nnx.eval_shape(lambda: LanguageModel(tiny_config("bmojo"), rngs=nnx.Rngs(0)))
  specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(model, nnx.Param)),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  names = {n for spec in specs for n in spec if n is not None}
  assert {"vocab", "embed", "inner", "state", "heads", "kv_heads", "head_dim", "conv", "rank"} <= names
  assert names <= set(tp.AXIS_NAMES)
  assert len(specs) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_shape_legend_holds_every_einsum_letter_and_axis_name():
  """bmojo_jax/typing.py is the one source: every einsum string in bmojo_jax/ and pallas_kernels/ uses its
  letters, and the logical-axis rules map exactly its axis names."""
  from bmojo_jax.train.sharding import LOGICAL_RULES  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).parents[1]
  specs = {spec for package in ("bmojo_jax", "pallas_kernels") for path in (root / package).rglob("*.py")
           for spec in re.findall(r"[\"']([A-Za-z,]+->[A-Za-z]*)[\"']", path.read_text())}
  assert len(specs) >= 15, specs   # the model's projections, decode attention, the LM head, the references
  unknown = {spec: sorted(set(spec) - set(tp.LETTERS) - set(",->")) for spec in specs}
  assert not {spec: letters for spec, letters in unknown.items() if letters}
  assert set(LOGICAL_RULES) == set(tp.AXIS_NAMES)


def test_lm_config_cpu_preset_and_required_paths():
  from bmojo_jax.configs import lm  # pylint: disable=g-import-not-at-top
  from bmojo_jax.train import tasks  # pylint: disable=g-import-not-at-top
  cpu = lm.get_config("hybrid,cpu")
  assert (cpu.model.family, cpu.model.d_model, cpu.data.seq_len, cpu.train.batch_size) == ("hybrid", 128, 256, 8)
  ModelConfig(**cpu.model.to_dict())
  with pytest.raises(ValueError, match="suffix 'tpu' is unknown"):
    lm.get_config("bmojo,tpu")
  with pytest.raises(ValueError, match="data.paths is empty"):
    tasks.make_task(lm.get_config())
