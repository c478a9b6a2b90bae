"""transformers' side of `compress verify`: the checkpoint loaded in this process (GPTQModel or bitsandbytes
for quantized ones, as transformers does it), and teacher-forced scoring of the engine's tokens."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from compress.errors import CompressError
from compress.quiet import auto_model_class, quiet_backends, quiet_import

log = logging.getLogger("compress")


def load_reference(folder: Path, dtype: torch.dtype, quantization: str | None = None):
    """The checkpoint as plain transformers loads it, on the CPU, in ``dtype``."""
    if quantization == "gptq":
        try:  # its banner goes to stdout, where verify prints its table
            quiet_import("gptqmodel")
        except ImportError:
            raise CompressError(f"{folder}: a GPTQ checkpoint; transformers needs GPTQModel to run it: "
                                "pip install -e '.[gptq]'") from None
    with quiet_backends():
        try:
            model = auto_model_class().from_pretrained(folder, dtype=dtype, device_map="cpu")
        except (OSError, ValueError, ImportError, RuntimeError) as e:
            raise CompressError(f"{folder}: transformers cannot load this checkpoint "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return model.eval()


@torch.no_grad()
def teacher_forced(model, prompt: list[int], continuation: list[int]) -> tuple[list[int], list[float], list[float]]:
    """At each position of ``continuation``: transformers' argmax, its log-probability of the given token and
    of its argmax."""
    if not continuation:
        return [], [], []
    x = torch.tensor([prompt + continuation[:-1]])
    with quiet_backends():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, len(prompt) - 1:].float()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(continuation)
    top, argmax = logp.max(-1)
    return argmax.tolist(), logp.gather(1, target[:, None])[:, 0].tolist(), top.tolist()


def reference_outputs(folder: Path, dtype: torch.dtype, prompts: list[list[int]],
                      engine_outputs: list[dict[str, Any]], quantization: str | None = None) -> list[dict[str, Any]]:
    """Per prompt, on the engine's tokens: transformers' argmax and log-probabilities, from one full forward
    pass (no KV cache: the plainest computation of the model).

    transformers' own greedy continuation (each token from a full forward over the sequence so far) equals
    the engine's tokens exactly when this argmax equals the engine's token at every position: by induction
    both then see the same prefix at every step, and they stop at the same end-of-sequence token. So one
    forward per prompt decides "same tokens", and at the first position where they part, the argmax *is*
    transformers' greedy token. (``generate`` with its KV cache sums in another order and was seen to flip
    a near-tie that the full forward and vLLM agree on.)"""
    model = load_reference(folder, dtype, quantization)
    out = []
    for prompt, engine in zip(prompts, engine_outputs):
        argmax, logps, top = teacher_forced(model, prompt, engine["tokens"])
        out.append({"tokens": argmax, "forced_argmax": argmax, "forced_logprobs": logps, "forced_top_logprobs": top})
    del model
    return out
