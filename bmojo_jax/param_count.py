"""Closed-form parameter counts, checked against the modules in tests (via `jax.eval_shape`)."""

from __future__ import annotations

from typing import Callable

from bmojo_jax.config import ModelConfig, Sublayer


def _mamba_params(cfg: ModelConfig) -> int:
  d, e, n, r, w = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.rank, cfg.d_conv
  return (d * 2 * e            # in_proj
          + w * e + e          # depthwise conv + bias
          + e * (r + 2 * n)    # x_proj
          + r * e + e          # dt_proj + dt_bias
          + e * n + e          # A_log, D
          + e * d)             # out_proj


# Parameters of one mixer of each kind (without its norm); tests/test_config.py checks each against the module
# `bmojo_jax.model.MIXERS` builds for that kind.
SUBLAYER_PARAMS: dict[Sublayer, Callable[[ModelConfig], int]] = {
    Sublayer.MAMBA: _mamba_params,
    Sublayer.ATTENTION: lambda cfg: (cfg.d_model * cfg.head_size * (2 * cfg.n_heads + 2 * cfg.kv_heads)
                                     + (cfg.d_model if cfg.learned_selection else 0)     # + the scorer w_s [D]
                                     + (4 * cfg.d_model ** 2 if cfg.linear_selection else 0)),   # + W [4, D, D]
    Sublayer.MLP: lambda cfg: 3 * cfg.d_model * cfg.ff_size,
}


def sublayer_params(kind: Sublayer, cfg: ModelConfig) -> int:
  """Parameters of one sublayer, its RMSNorm included."""
  return SUBLAYER_PARAMS[Sublayer(kind)](cfg) + cfg.d_model


def count_params(cfg: ModelConfig) -> int:
  """Total trainable parameters of `LanguageModel(cfg)`."""
  per_block = sum(sublayer_params(kind, cfg) for kind in cfg.sublayers)
  embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  return embed + cfg.n_blocks * per_block + cfg.d_model


def attended_keys(cfg: ModelConfig, seq_len: int) -> float:
  """Keys one query attends to, averaged over positions 0..seq_len-1: its window (or causal prefix) plus the
  memory tokens of its chunk (none in chunk 0)."""
  w = seq_len if cfg.window is None else cfg.window
  window_keys = sum(min(t + 1, w) for t in range(seq_len)) / seq_len
  memory_chunks = max(0, seq_len - cfg.chunk) / seq_len
  return window_keys + (cfg.fading + cfg.eidetic) * memory_chunks


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward = 3x forward), as MFU counts them.

  Counted: every matmul (projections, MLP, the LM head) at 2 FLOPs per multiply-add, the fading tokens'
  key/value projections (M_f read-outs per chunk; at every position for the `ssm_error` selection, which scores
  with them), and attention's scores and weighted values, 4·H·P per attended key (`attended_keys`).
  Not counted: the selective scan, norms, activations, and recomputation (remat, flash backward).
  """
  d, e, h, kh, p = cfg.d_model, cfg.d_inner, cfg.n_heads, cfg.kv_heads, cfg.head_size
  fading_share = 1.0 if cfg.scores_read_fading else cfg.fading / cfg.chunk   # positions projected (Attention)
  matmul = {Sublayer.MAMBA: _mamba_params(cfg) - e * (cfg.d_conv + 3 + cfg.d_state),   # no conv, biases, A, D
            Sublayer.ATTENTION: SUBLAYER_PARAMS[Sublayer.ATTENTION](cfg) + 2 * d * kh * p * fading_share,
            Sublayer.MLP: SUBLAYER_PARAMS[Sublayer.MLP](cfg)}
  attention = 4 * h * p * attended_keys(cfg, seq_len)
  per_block = sum(2 * matmul[k] + (attention if k == Sublayer.ATTENTION else 0) for k in cfg.sublayers)
  return 3.0 * (cfg.n_blocks * per_block + 2 * d * cfg.vocab_size)
