"""Bridges to other tools: transformers, lm-evaluation-harness."""
