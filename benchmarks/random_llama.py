"""Llama-shaped models with random weights, for speed and memory benchmarks (time and bytes do not
depend on the values). ``7b`` is Llama-2-7B's shape; ``tiny`` runs the same code on a CPU in
seconds (``--shape tiny``, the dry run that checks a GPU script's logic without a GPU)."""

from __future__ import annotations

import sys

import torch
import transformers

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}
# Layers to remove: ShortGPT Table 4 for Llama-2-7B (32 -> 23); one layer of the tiny one.
REMOVE = {"7b": [27, 26, 25, 28, 24, 29, 23, 21, 22], "tiny": [2]}


def random_llama(shape: str, dtype: torch.dtype = torch.float16, device: str = "cpu", attn: str = "sdpa"):
    """A LlamaForCausalLM of ``SHAPES[shape]`` built directly on ``device`` in ``dtype``, eval mode."""
    config = transformers.LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def require_cuda(device: str, script: str) -> None:
    """Exit non-zero with a message when ``device`` is CUDA and no CUDA GPU is visible."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"{script}: --device {device} asked for, but no CUDA GPU is visible "
                 f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); run it on a GPU machine "
                 "with a CUDA build of torch, or use --device cpu --shape tiny for a dry run")
