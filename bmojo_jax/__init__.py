"""bmojo_jax: B'MOJO and its baselines (Transformer, Mamba, Hybrid, B'MOJO-F) on one Flax NNX skeleton."""

from bmojo_jax.config import (AttnImpl, ComputeConfig, ConfigError, Family, ModelConfig, RematPolicy, ScanImpl,
                              StorePolicy, Sublayer)
from bmojo_jax.presets import PRESET_NAMES, mqar_config, paper_config, preset
from bmojo_jax.model import LanguageModel
from bmojo_jax.param_count import count_params

__all__ = [
    "AttnImpl", "ComputeConfig", "ConfigError", "Family", "LanguageModel", "ModelConfig", "PRESET_NAMES",
    "RematPolicy", "ScanImpl", "StorePolicy", "Sublayer", "count_params", "mqar_config", "paper_config", "preset",
]
