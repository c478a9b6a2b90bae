"""Serving checks: load a checkpoint in an engine (vLLM, transformers) and compare its greedy tokens with
transformers' on the same prompts. See ``verify.py``."""
