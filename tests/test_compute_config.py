"""ModelConfig.compute (a ComputeConfig): how a model is computed, apart from what its parameters are. Checkpoint
compatibility ignores it by type; run configs nest it (--config.model.compute.<field>); config dicts and
checkpoint meta of the previous layout (the compute fields flat under "model") are read in the current one."""

import dataclasses
import json
import os

import jax.numpy as jnp
import ml_collections
import pytest

from bmojo_jax import ComputeConfig, ConfigError, ModelConfig, preset
from bmojo_jax.config import COMPUTE_FIELDS, nest_compute
from bmojo_jax.configs import mqar
from tests.conftest import tiny_config
from bmojo_jax.train import checkpoint as ckpt_lib
from bmojo_jax.train import runs
from bmojo_jax.train import setup as setup_lib


def _flat(model: dict) -> dict:
  """A current-layout model dict in the layout before ModelConfig.compute: its compute fields flat."""
  return {**{k: v for k, v in model.items() if k != "compute"}, **model["compute"]}


def test_compute_fields_live_only_in_compute():
  model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
  assert not model_fields & set(COMPUTE_FIELDS) and "compute" in model_fields
  cfg = tiny_config("bmojo", compute=dict(scan_impl="associative", dtype="bfloat16", remat=True))
  assert cfg.compute.scan_impl == "associative" and cfg.compute.jnp_dtype == jnp.bfloat16
  assert cfg.compute.remat == "full"                     # remat=True, as before the policies
  changed = cfg.with_compute(attn_impl="reference", scan_layers=True)
  assert changed.compute == cfg.compute.replace(attn_impl="reference", scan_layers=True)
  assert changed.replace(compute=cfg.compute) == cfg and hash(changed) != hash(cfg)
  assert ModelConfig(compute={"scan_chunk": 16}).compute == ComputeConfig(scan_chunk=16)   # from a config dict
  with pytest.raises(TypeError, match="scan_impl"):
    ModelConfig(scan_impl="pallas")                     # the flat keyword of the previous layout
  with pytest.raises(ConfigError, match="compute=3 must be a ComputeConfig"):
    ModelConfig(compute=3)
  with pytest.raises(ConfigError, match="compute.attn_impl='cudnn' has no memory tokens"):
    preset("bmojo-mqar", compute=ComputeConfig(attn_impl="cudnn"))


def test_run_configs_nest_compute():
  c = mqar.get_config("bmojo")
  assert set(c.model.compute) == set(COMPUTE_FIELDS) and not set(c.model) & set(COMPUTE_FIELDS)
  c.model.compute.scan_impl = "associative"
  assert setup_lib.model_config(c).compute.scan_impl == "associative"
  assert ckpt_lib.model_config_dict(setup_lib.model_config(c))["compute"]["scan_impl"] == "associative"


def test_nest_compute_reads_the_previous_layout():
  model = ckpt_lib.model_config_dict(tiny_config("hybrid", compute=dict(scan_layers=True, dtype="bfloat16")))
  old = _flat(model)
  assert "compute" not in old and old["scan_layers"] is True
  assert nest_compute(old) == model and nest_compute(model) == model
  assert ModelConfig(**nest_compute(old)) == tiny_config("hybrid", compute=dict(scan_layers=True, dtype="bfloat16"))


def test_upgrade_config_reads_an_old_config_json(tmp_path):
  """A config.json of the previous layout (compute flat under model, no mesh.logical_axis_rules) loads as the
  current config would have been written."""
  config = mqar.get_config("hybrid")
  new = json.loads(config.to_json_best_effort(sort_keys=True))
  old = json.loads(json.dumps(new))
  old["model"] = _flat(old["model"])
  del old["mesh"]["logical_axis_rules"]
  (tmp_path / runs.CONFIG_FILE).write_text(json.dumps(old))
  assert runs.load_config(str(tmp_path)).to_dict() == ml_collections.ConfigDict(new).to_dict()


def test_checkpoint_compatibility_ignores_compute_by_type(tmp_path):
  """check_compatible compares model configs without their compute, for meta of either layout; the returned
  meta is in the current layout (its compute.scan_layers tells the parameter layout)."""
  cfg = tiny_config("bmojo")
  written = ckpt_lib.model_config_dict(cfg)
  before_scan_layers = {k: v for k, v in _flat(written).items() if k != "scan_layers"}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=10, async_save=False, writer=True)
  for step, meta_model in ((1, written), (2, _flat(written)), (3, before_scan_layers)):
    ckpt.save(step, {"x": jnp.zeros(2)}, None, {"model": meta_model})
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=10, async_save=False)
  try:
    other = ckpt_lib.model_config_dict(cfg.with_compute(scan_impl="associative", attn_impl="pallas",
                                                        dtype="bfloat16", scan_layers=True, remat="full"))
    for step in (1, 2, 3):
      meta = ckpt.check_compatible(step, other)
      assert meta["model"] == written, step       # old meta read in the current layout (scan_layers: False)
      with pytest.raises(ckpt_lib.CheckpointError, match=r"differing fields: d_model: checkpoint 32, config 64"):
        ckpt.check_compatible(step, ckpt_lib.model_config_dict(cfg.replace(d_model=64)))
  finally:
    ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]


def test_load_run_overrides_name_compute_fields():
  overrides = {"n_eidetic": 8, "compute.attn_impl": "reference"}
  assert runs._compute_overrides(overrides) == {"attn_impl": "reference"} and overrides == {"n_eidetic": 8}
  with pytest.raises(ValueError, match=r"model override 'scan_impl' is now compute.scan_impl"):
    runs._compute_overrides({"scan_impl": "associative"})
  with pytest.raises(ValueError, match=r"compute.scan_kind names no ComputeConfig field"):
    runs._compute_overrides({"compute.scan_kind": "associative"})


def test_paper_presets_train_in_their_family_layout():
  """A paper preset's compute is its family's PAPER_LAYOUT (the Transformer a loop of blocks, the families with
  a selective scan one scan over them, both `dots_attention`); a dict of compute fields is set over that layout,
  a ComputeConfig is taken whole."""
  from bmojo_jax.presets import PAPER_LAYOUT
  for name in ("transformer-130m", "hybrid-1.4b", "bmojo-370m", "mamba-790m"):
    compute = preset(name).compute
    assert (compute.scan_layers, compute.remat.value) == (not name.startswith("transformer"), "dots_attention")
  assert preset("hybrid-130m").compute.scan_layers == PAPER_LAYOUT[preset("hybrid-130m").family]["scan_layers"]
  merged = preset("bmojo-130m", compute=dict(dtype="bfloat16", remat="full")).compute
  assert (merged.scan_layers, merged.remat.value, merged.dtype) == (True, "full", "bfloat16")
  whole = preset("bmojo-130m", compute=ComputeConfig(dtype="bfloat16")).compute
  assert whole == ComputeConfig(dtype="bfloat16")
  assert preset("bmojo-mqar").compute == ComputeConfig()        # MQAR-sized models keep the plain defaults
  with pytest.raises(ConfigError, match=r"\['remt'\] are not ComputeConfig fields"):
    preset("bmojo-130m", compute=dict(remt="full"))
