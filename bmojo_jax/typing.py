"""Shape legend for bmojo_jax: the one source of the shape letters and logical axis names.

`LETTERS` holds every letter of the einsum strings of bmojo_jax/ and pallas_kernels/ and of the docstring
shapes ([B, T, D]) of bmojo_jax/ (a kernel docstring that needs a letter of its own, such as the scan's time
segments, defines it where it uses it). The constants below are the logical axis names arrays carry
(parameters through `bmojo_jax.layers.param`, the residual stream through sharding constraints), each with its
letter; the logical-axis rules (`pallas_kernels/sharding.py`'s `LOGICAL_RULES` by default, a run config's
`mesh.logical_axis_rules`) map exactly these names to mesh axes.
tests/test_config.py checks both: a new letter or axis name starts here.
"""

from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
DType = Any

LETTERS: dict[str, str] = {
    "B": "batch",
    "T": "tokens (queries)",
    "S": "key positions",
    "D": "model width (d_model)",
    "F": "MLP hidden width (d_ff)",
    "V": "vocabulary",
    "E": "Mamba inner width (expand·D)",
    "N": "SSM state size (d_state)",
    "R": "dt low rank (dt_rank)",
    "W": "conv kernel width (d_conv)",
    "X": "x_proj's output columns (R + 2N: dt_low, B_t, C_t)",
    "J": "the two halves of the Mamba in_proj (u, z)",
    "H": "query heads",
    "K": "key/value heads",
    "G": "query heads per key/value head (H / K)",
    "P": "head dim",
    "C": "chunks (ceil(T / L))",
    "L": "chunk length",
    "M": "memory slots of a chunk (fading + eidetic)",
    "Y": "blocks (the stacked layers of a scanned model)",
}

# Logical axis names (letter in LETTERS).
BATCH = "batch"        # B (activations)
SEQ = "seq"            # T (activations)
VOCAB = "vocab"        # V
EMBED = "embed"        # D
MLP = "mlp"            # F
INNER = "inner"        # E
STATE = "state"        # N
RANK = "rank"          # R
CONV = "conv"          # W
HEADS = "heads"        # H
KV_HEADS = "kv_heads"  # K
HEAD_DIM = "head_dim"  # P
LAYERS = "layers"      # Y

AXIS_NAMES = (BATCH, SEQ, VOCAB, EMBED, MLP, INNER, STATE, RANK, CONV, HEADS, KV_HEADS, HEAD_DIM, LAYERS)
