"""Configs: impossible ones fail naming the field; preset parameter counts match the closed form."""

import jax
import pytest
from flax import nnx

from bmojo_jax import ConfigError, LanguageModel, ModelConfig, PRESET_NAMES, count_params, preset
from tests.conftest import tiny_config


@pytest.mark.parametrize("overrides, needle", [
    (dict(n_heads=3), "n_heads=3 does not divide d_model=32"),
    (dict(chunk_size=3), "chunk_size=3 must divide window=8"),
    (dict(n_eidetic=5), "n_eidetic=5 must be a multiple of eidetic_per_chunk=2"),
    (dict(n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
    (dict(n_fading=5), "n_fading=5 must be in 1..chunk_size=4"),
    (dict(window=None), "window=None"),
    (dict(n_layers=3), "n_layers=3 must be even"),
    (dict(dtype="float33"), "dtype='float33'"),
    (dict(scan_impl="magic"), "scan_impl='magic' is unknown"),
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
  cfg = preset(name)
  abstract = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert n == count_params(cfg)


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
  assert len(specs) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_lm_config_cpu_preset_and_required_paths():
  from configs import lm  # pylint: disable=g-import-not-at-top
  from train import tasks  # pylint: disable=g-import-not-at-top
  cpu = lm.get_config("hybrid,cpu")
  assert (cpu.model.family, cpu.model.d_model, cpu.data.seq_len, cpu.train.batch_size) == ("hybrid", 128, 256, 8)
  ModelConfig(**cpu.model.to_dict())
  with pytest.raises(ValueError, match="suffix 'tpu' is unknown"):
    lm.get_config("bmojo,tpu")
  with pytest.raises(ValueError, match="data.paths is empty"):
    tasks.make_task(lm.get_config())
