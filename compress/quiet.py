"""Keep the quantization backends' import-time chatter out of the user's log.

transformers imports torchao (a GPTQModel dependency) as soon as its model classes load, whether or
not a recipe quantizes; on a machine without torchao's CUDA kernels or Triton that logs "Failed to
load .../_C_mxfp8...so", "Detected no triton" and torch pytree deprecation notices. GPTQModel
prints a banner and a GIL warning on import; bitsandbytes logs which CPU kernels it lacks. None of
it is about the user's run; nor is lm-eval's (``evaluate.tasks``) log of each evaluator step and its
warning that a model object came instead of a name (compress logs what ran and the results).
``quiet_backends()`` raises those libraries' loggers to ERROR and ignores their Python warnings
for the duration of a block, then restores exactly what was set before: compress's own log and
everyone else's warnings are untouched.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings
from collections.abc import Iterator
from types import ModuleType

LOGGERS = ("torchao", "torch.utils._pytree", "gptqmodel", "logbar", "bitsandbytes", "optimum", "tokenicer",
           "defuser", "lm_eval")
MODULES = r"(torchao|gptqmodel|logbar|bitsandbytes|optimum|defuser|tokenicer|lm_eval)(\.|$)"


@contextlib.contextmanager
def quiet_backends() -> Iterator[None]:
    """Backends' loggers at ERROR and their warnings ignored inside the block; restored after."""
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=MODULES)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def quiet_import(name: str) -> ModuleType:
    """``import name`` with what it logs, warns or prints while importing kept out of the log
    (GPTQModel prints its banner to stdout, where `compress run` writes the stage table)."""
    with quiet_backends(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return importlib.import_module(name)


def auto_model_class():
    """transformers' ``AutoModelForCausalLM``, with transformers' modeling code (which imports
    torchao when it is installed) imported here, quietly: the auto class alone is lazy and would
    import it at the first ``from_pretrained``."""
    with quiet_backends():
        import transformers.modeling_utils  # noqa: F401
        from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM
