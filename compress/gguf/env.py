"""Where llama.cpp's tools live: the folder ``bash scripts/gguf-env.sh`` builds (converter, llama-imatrix,
the llama-cpp-python wheel it installed into this Python), found by $COMPRESS_GGUF_ENV or beside the
checkout. Nothing here builds anything."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompressError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
ENV_VAR = "COMPRESS_GGUF_ENV"
REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO.parent / "shared-cache" / "envs" / f"llamacpp-{LLAMA_CPP_PYTHON_VERSION}"
HOW_TO = ("build it once with `bash scripts/gguf-env.sh` (about 10 minutes on 2 cores; it installs the pinned "
          f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} into this Python) and set "
          f"{ENV_VAR}=\"$(bash scripts/gguf-env.sh)\"")


@dataclass(frozen=True)
class GGUFEnv:
    folder: Path

    @property
    def converter(self) -> Path:
        return self.folder / "converter" / "convert_hf_to_gguf.py"

    @property
    def imatrix_tool(self) -> Path:
        return self.folder / "bin" / "llama-imatrix"

    def tool_env(self) -> dict[str, str]:
        """Environment for llama.cpp's binaries: their libraries are in lib/ (the build's rpath is gone)."""
        lib = str(self.folder / "lib")
        old = os.environ.get("LD_LIBRARY_PATH")
        return {**os.environ, "LD_LIBRARY_PATH": lib + (os.pathsep + old if old else "")}

    def converter_pythonpath(self) -> str:
        c = self.folder / "converter"
        return f"{c / 'gguf-py'}{os.pathsep}{c}"


def missing_reason() -> str | None:
    """Why the llama.cpp environment is not usable here (None: it is)."""
    chosen = os.environ.get(ENV_VAR)
    folder = Path(chosen).expanduser() if chosen else DEFAULT
    source = ENV_VAR if chosen else f"the default folder {DEFAULT}"
    if not (folder / ".compress-stamp").is_file():
        return f"no llama.cpp environment ({source}: {folder} has no .compress-stamp); {HOW_TO}"
    env = GGUFEnv(folder)
    for path in (env.converter, env.imatrix_tool):
        if not path.is_file():
            return f"{path} is missing (an incomplete llama.cpp environment); {HOW_TO}"
    try:
        import llama_cpp
    except ImportError:
        return f"llama_cpp is not installed in this Python; {HOW_TO}"
    if llama_cpp.__version__ != LLAMA_CPP_PYTHON_VERSION:
        return (f"llama_cpp {llama_cpp.__version__} is installed; compress is tested with "
                f"{LLAMA_CPP_PYTHON_VERSION}, whose converter is in {folder}; {HOW_TO}")
    try:
        import sentencepiece  # noqa: F401  (llama.cpp's converter imports it for every tokenizer)
    except ImportError:
        return f"sentencepiece is not installed (llama.cpp's converter imports it); {HOW_TO}"
    return None


def gguf_env() -> GGUFEnv:
    """The usable environment, or CompressError saying how to build it."""
    why = missing_reason()
    if why is not None:
        raise CompressError(why)
    chosen = os.environ.get(ENV_VAR)
    return GGUFEnv(Path(chosen).expanduser() if chosen else DEFAULT)


def gguf_reader(converter_folder: Path | None = None):
    """llama.cpp's own ``gguf.GGUFReader``, from the environment's ``gguf-py`` copy, whatever else a plain
    ``import gguf`` would find first: a namespace folder named ``gguf`` on sys.path (pytest puts ``tests/``
    there, which holds ``tests/gguf/``) or another release of the pip ``gguf`` package."""
    import importlib
    import sys

    folder = ((converter_folder or gguf_env().converter.parent) / "gguf-py").resolve()
    loaded = sys.modules.get("gguf")
    if loaded is not None and Path(getattr(loaded, "__file__", None) or "/").resolve().is_relative_to(folder):
        return loaded.GGUFReader
    for name in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
        del sys.modules[name]  # the wrong gguf: llama.cpp's is imported in its place
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("gguf")
    finally:
        sys.path.remove(str(folder))
    if not Path(getattr(module, "__file__", None) or "/").resolve().is_relative_to(folder):
        raise CompressError(f"{folder}: llama.cpp's gguf-py is not there (found {module!r}); rebuild the "
                            f"environment: {HOW_TO}")
    return module.GGUFReader
