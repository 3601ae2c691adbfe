"""Bridges to other tools: transformers, lm-evaluation-harness (each module imports only its own library)."""
