"""Studies: research experiments (MQAR sweep, selection, length, language models, the scaling projection)."""
