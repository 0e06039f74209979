"""Checkpoints restore parameters by their tree paths: every family's paths and shapes, written out here, so a
refactor that renames or moves a parameter fails this test instead of every saved run."""

import jax
import pytest
from flax import nnx

from bmojo_jax import LanguageModel
from tests.conftest import tiny_config

# tiny_config: d 32, vocab 64, 4 heads of 8 (2 kv heads), Mamba inner width 64, d_state 4, dt rank 2, conv 4.
MAMBA = {"A_log": (64, 4), "D": (64,), "conv_bias": (64,), "conv_weight": (4, 64), "dt_bias": (64,),
         "dt_proj/kernel": (2, 64), "in_proj/kernel": (32, 2, 64), "out_proj/kernel": (64, 32),
         "x_proj/kernel": (64, 10)}
ATTENTION = {"wq/kernel": (32, 4, 8), "wk/kernel": (32, 2, 8), "wv/kernel": (32, 2, 8), "wo/kernel": (4, 8, 32)}
MLP = {"gate/kernel": (32, 128), "up/kernel": (32, 128), "down/kernel": (128, 32)}
SUBLAYERS = {"transformer": (ATTENTION, MLP), "mamba": (MAMBA, MAMBA), "hybrid": (MAMBA, ATTENTION),
             "bmojo_f": (MAMBA, ATTENTION), "bmojo": (MAMBA, ATTENTION)}


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
  model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): x.shape for path, x in leaves}


def expected(family: str, *, scorer: bool = False, lm_head: bool = False, scanned: bool = False):
  block = {"norm1/scale": (32,), "norm2/scale": (32,)}
  for name, params in zip(("mixer1", "mixer2"), SUBLAYERS[family]):
    block.update({f"{name}/{k}": shape for k, shape in params.items()})
  if scorer:
    block["mixer2/scorer"] = (32,)
  prefix, lead = ("blocks", (1,)) if scanned else ("blocks/0", ())   # scanned: stacked over the 1 block
  shapes = {f"{prefix}/{k}": lead + shape for k, shape in block.items()}
  shapes.update({"embed": (64, 32), "final_norm/scale": (32,)})
  if lm_head:
    shapes["lm_head"] = (32, 64)
  return shapes


@pytest.mark.parametrize("family", list(SUBLAYERS))
def test_parameter_paths(family):
  assert param_shapes(tiny_config(family)) == expected(family)


def test_parameter_paths_of_the_scorer_untied_head_and_scanned_layers():
  cfg = tiny_config("bmojo", selection="learned", tie_embeddings=False)
  assert param_shapes(cfg) == expected("bmojo", scorer=True, lm_head=True)
  assert (param_shapes(cfg.with_compute(scan_layers=True))
          == expected("bmojo", scorer=True, lm_head=True, scanned=True))
