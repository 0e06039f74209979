"""Shape legend for bmojo_jax.

Every docstring, einsum string and logical sharding name in the package uses these letters.

    B  batch                         T  tokens (queries)          S  key positions
    D  model width (d_model)         F  MLP hidden width          V  vocabulary
    E  Mamba inner width (expand·D)  N  SSM state size            R  dt low rank
    W  conv kernel width (4)         H  query heads               K  key/value heads
    G  query heads per kv head       P  head dim                  C  chunks (ceil(T / L))
    L  chunk length                  M  memory slots (fading + eidetic)
    J  the two halves of the Mamba in_proj (u, z)   X  x_proj's columns (dt rank R + 2N)
    Y  blocks (layers of a scanned model's stacked parameters)

Logical axis names carried by parameters (see `bmojo_jax.sharding_rules`):

    "vocab" V, "embed" D, "mlp" F, "inner" E, "state" N, "rank" R, "conv" W,
    "heads" H, "kv_heads" K, "head_dim" P, "layers" Y (the stacked blocks of a scanned model).
"""

from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
DType = Any

# Logical axis names of parameters.
VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
INNER = "inner"
STATE = "state"
RANK = "rank"
CONV = "conv"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
LAYERS = "layers"
