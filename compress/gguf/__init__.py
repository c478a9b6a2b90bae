"""GGUF export: llama.cpp's own converter, quantizer and importance-matrix tool on a compress checkpoint."""
