"""compress: depth pruning + quantization for Hugging Face causal LMs, with measured costs."""

__version__ = "0.1.0"
