"""Closed-form parameter counts, checked against the modules in tests (via `jax.eval_shape`)."""

from __future__ import annotations

from bmojo_jax.config import ModelConfig


def sublayer_params(kind: str, cfg: ModelConfig) -> int:
  """Parameters of one sublayer, its RMSNorm included."""
  d = cfg.d_model
  if kind == "mamba":
    e, n, r, w = cfg.d_inner, cfg.d_state, cfg.rank, cfg.d_conv
    return (d * 2 * e            # in_proj
            + w * e + e          # depthwise conv + bias
            + e * (r + 2 * n)    # x_proj
            + r * e + e          # dt_proj + dt_bias
            + e * n + e          # A_log, D
            + e * d              # out_proj
            + d)                 # norm
  if kind == "attention":
    h, kh, p = cfg.n_heads, cfg.kv_heads, cfg.head_size
    return d * p * (2 * h + 2 * kh) + d
  if kind == "mlp":
    return 3 * d * cfg.ff_size + d
  raise ValueError(f"unknown sublayer {kind!r}")


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

  Counted: every matmul (projections, MLP, the fading tokens' key/value projections, the LM head) at 2 FLOPs
  per multiply-add, and attention's scores and weighted values, 4·H·P per attended key (`attended_keys`).
  Not counted: the selective scan, norms, activations, and recomputation (remat, flash backward).
  """
  d, e, n, r = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.rank
  h, kh, p = cfg.n_heads, cfg.kv_heads, cfg.head_size
  matmul = {"mamba": d * 2 * e + e * (r + 2 * n) + r * e + e * d,
            "attention": d * p * (2 * h + 2 * kh) + (2 * d * kh * p if cfg.fading else 0),
            "mlp": 3 * d * cfg.ff_size}
  per_block = sum(2 * matmul[k] + (4 * h * p * attended_keys(cfg, seq_len) if k == "attention" else 0)
                  for k in cfg.sublayers)
  return 3.0 * (cfg.n_blocks * per_block + 2 * d * cfg.vocab_size)
