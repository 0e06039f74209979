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
