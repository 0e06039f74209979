"""Model presets: the Mamba paper's sizes for each family (`paper_config`), MQAR-sized models (`mqar_config`),
and `preset('<family>-<size>')` over both. Each takes ModelConfig fields as overrides (how the model computes
as `compute=ComputeConfig(...)`)."""

from __future__ import annotations

from typing import Any

from bmojo_jax.config import COMPUTE_FIELDS, ComputeConfig, ConfigError, Family, ModelConfig

# Paper sizes follow the Mamba paper (layers counted as sublayers); vocab 50280 is GPT-NeoX's padded.
PAPER_SIZES = {
    "130m": dict(d_model=768, n_layers=24),
    "370m": dict(d_model=1024, n_layers=48),
    "790m": dict(d_model=1536, n_layers=48),
    "1.4b": dict(d_model=2048, n_layers=48),
}
FAMILY_DEFAULTS = {
    Family.TRANSFORMER: dict(window=None, chunk_size=128),
    Family.MAMBA: dict(),
    Family.HYBRID: dict(),
    Family.BMOJO_F: dict(),
    Family.BMOJO: dict(),
}

# The block layout a paper-size model trains in: per family the fastest layout measured whose step compiles in
# about 20 s or less (one H100, 16k tokens a step; docs/train_speed.md, "Layout"). The Transformer runs its blocks as a
# Python loop (1.4B, 2k: 281 ms against 300 scanned; compile 13-23 s). Every family with a selective scan runs
# them as one lax.scan: unrolled, each Pallas call site compiles again (~85 s at 130M, ~200 s at 1.4B) for 3% at
# 130M. Both keep matmul and attention-kernel outputs and rerun the selective scan's forward in the backward
# ("dots_attention"), so every family trains 16k tokens a step at 1.4B, 2k on one 80 GB card.
PAPER_LAYOUT = {family: dict(scan_layers=family != Family.TRANSFORMER, remat="dots_attention") for family in Family}


def paper_config(family: str | Family, size: str, **overrides: Any) -> ModelConfig:
  """A paper-size model: window 512 at 2k context, head_dim 64, M_f 16, M_e 64 (k_e 16) — ours — in its family's
  `PAPER_LAYOUT`. `compute` may be a dict of ComputeConfig fields, set over that layout, or a ComputeConfig,
  taken whole."""
  family = Family(family)
  if size not in PAPER_SIZES:
    raise ConfigError(f"size={size!r} is unknown; choose one of {list(PAPER_SIZES)}")
  d = PAPER_SIZES[size]["d_model"]
  kw = dict(family=family, vocab_size=50280, n_heads=d // 64, window=512, chunk_size=512,
            n_fading=16, n_eidetic=64, eidetic_per_chunk=16, **PAPER_SIZES[size])
  kw.update(FAMILY_DEFAULTS[family])
  compute = overrides.pop("compute", None)
  if not isinstance(compute, ComputeConfig):
    unknown = sorted(set(compute or {}) - set(COMPUTE_FIELDS))
    if unknown:
      raise ConfigError(f"compute={compute}: {unknown} are not ComputeConfig fields; choose from "
                        f"{list(COMPUTE_FIELDS)}")
    compute = ComputeConfig(**{**PAPER_LAYOUT[family], **(compute or {})})
  kw.update(overrides, compute=compute)
  return ModelConfig(**kw)


def mqar_config(family: str | Family, d_model: int = 128, **overrides: Any) -> ModelConfig:
  """An MQAR-sized model (Zoology): 2 blocks, window 32, chunk 32 (B'MOJO setting)."""
  family = Family(family)
  kw = dict(family=family, vocab_size=8192, d_model=d_model, n_layers=4, n_heads=2, window=32,
            chunk_size=32, n_fading=4, n_eidetic=32, eidetic_per_chunk=8)
  kw.update(FAMILY_DEFAULTS[family])
  kw.update(overrides)
  return ModelConfig(**kw)


def preset(name: str, **overrides: Any) -> ModelConfig:
  """`<family>-<size>` with size in PAPER_SIZES (e.g. 'bmojo-1.4b') or 'mqar' (e.g. 'hybrid-mqar')."""
  family, _, size = name.rpartition("-")
  if family not in {f.value for f in Family}:
    raise ConfigError(f"preset {name!r}: family {family!r} is unknown; use <family>-<size> with family in "
                      f"{[f.value for f in Family]} and size in {['mqar', *PAPER_SIZES]}")
  if size == "mqar":
    return mqar_config(family, **overrides)
  return paper_config(family, size, **overrides)


PRESET_NAMES = tuple(f"{f.value}-{s}" for f in Family for s in ("mqar", *PAPER_SIZES))
