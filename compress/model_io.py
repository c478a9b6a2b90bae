"""Load models (hub id or local folder) and write checkpoints atomically.

A checkpoint is what ``save_pretrained`` writes (safetensors + config + generation config) plus the
tokenizer and ``compress.json`` (provenance). It is written to a temporary sibling folder and
renamed into place, so a checkpoint folder under its final name is always complete. The input
model folder is only ever read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from compress.errors import CompressError
from compress.evaluate.memory import proc_kib_field
from compress.faults import crash_point
from compress.model_checks import config_problems, layer_count_problem, loading_problems
from compress.stages.base import ModelFacts
from compress.surgery import LAYOUTS

log = logging.getLogger("compress")
PROVENANCE = "compress.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = "auto, cpu, cuda, cuda:N, mps"


def resolve_device(device: str) -> torch.device:
    """``auto`` = cuda if present, else cpu. A device that is absent or unknown is a CompressError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import re

    if not isinstance(device, str) or not re.fullmatch(r"cpu|mps|cuda(:\d{1,4})?", device):
        raise CompressError(f"device: {device!r} is not a device compress runs on; allowed: {DEVICES}")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CompressError(f"device: {device!r} asked for, but no CUDA GPU is visible "
                                "(torch.cuda.is_available() is False); use device: cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CompressError(f"device: {device!r}, but only {torch.cuda.device_count()} GPU(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CompressError(f"device: {device!r} asked for, but MPS is not available")
    return dev


def resolve_dtype(dtype: str, config) -> torch.dtype:
    """``auto`` = the dtype the checkpoint declares (float32 if it declares none)."""
    if dtype != "auto":
        return DTYPES[dtype]
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared)
    return declared if declared in DTYPES.values() else torch.float32


def read_config(model: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's config (config.json only: no weights are read). CompressError naming the key
    when a shape key is missing or malformed (transformers would use a default or raise deep inside)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, PretrainedConfig

    try:
        raw, _ = PretrainedConfig.get_config_dict(model, revision=revision)
        if raw.get("model_type") in LAYOUTS:
            check_raw_config(model, raw)
            check_layer_count(model, raw["num_hidden_layers"])
        return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CompressError(f"model {model!r}: cannot read its config ({str(e).splitlines()[0]})") from None
    except (StrictDataclassError, TypeError) as e:
        detail = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        detail = re.sub(r"^\w+Error: ", "", detail)
        raise CompressError(f"model {model!r}: config.json is not valid: {detail}; fix config.json") from None


def check_raw_config(model: str, raw: dict[str, Any]) -> None:
    """CompressError listing every problem with config.json's shape keys."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[raw["model_type"]] if raw["model_type"] in CONFIG_MAPPING else None
    problems = config_problems(raw, getattr(cls, "attribute_map", None))
    if problems:
        raise CompressError(f"model {model!r}: config.json: " + "; ".join(problems)
                            + "; fix config.json (is it the config of these weights?)")


def checkpoint_tensor_names(folder: Path) -> list[str]:
    """Names of the tensors in a local folder's safetensors files (headers only; [] if none)."""
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        return list(read_json(index, "").get("weight_map", {}))
    names: list[str] = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as f:
                names.extend(f.keys())
        except (SafetensorError, OSError) as e:
            raise CompressError(f"model {str(folder)!r}: cannot load its weights ({path.name}: "
                                f"{str(e).splitlines()[0]}); is the file complete?") from None
    return names


def check_layer_count(model: str, num_layers: int) -> None:
    """For a local folder: CompressError before loading if config.json's layer count is not the
    number of layers its weights hold (transformers would fill the rest with random values)."""
    folder = Path(model)
    if not folder.is_dir():
        return
    problem = layer_count_problem(checkpoint_tensor_names(folder), num_layers)
    if problem:
        raise CompressError(f"model {model!r}: {problem}")


def model_facts(config) -> ModelFacts:
    """Shape facts the recipe check needs; CompressError for unsupported architectures."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in LAYOUTS:
        raise CompressError(f"model_type {model_type!r} is not supported; supported: {sorted(LAYOUTS)}")
    return ModelFacts(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        num_attention_heads=getattr(config, "num_attention_heads", None),
        num_key_value_heads=getattr(config, "num_key_value_heads", None),
        intermediate_size=getattr(config, "intermediate_size", None),
        quantized=getattr(config, "quantization_config", None) is not None,
        hidden_size=getattr(config, "hidden_size", None),
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        head_dim=getattr(config, "head_dim", None),
    )


def content_hash(folder: Path) -> str:
    """sha256 over the names and bytes of the files that define a local model."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def source_info(model: str, is_local: bool, revision: str | None, config) -> dict[str, Any]:
    info: dict[str, Any] = {"model": model, "revision": revision,
                            "commit": getattr(config, "_commit_hash", None)}
    if is_local:
        info["content_sha256"] = content_hash(Path(model))
        prov = Path(model) / PROVENANCE
        if prov.exists():
            info["compress"] = json.loads(prov.read_text())
    return info


def local_model_dir(model: str, base: Path | None = None) -> Path | None:
    """The folder ``model`` names, if it is meant as a local path; None for a hub id.
    CompressError when it looks like a path but is no model folder."""
    explicit = model.startswith(("/", "./", "../", "~"))
    path = ((base or Path.cwd()) / Path(model).expanduser()).resolve()
    if not (explicit or path.exists()):
        return None
    if not path.exists():
        raise CompressError(f"model: local model folder {path} does not exist")
    if not path.is_dir():
        raise CompressError(f"model: {path} is a file; give the model's folder")
    if not (path / "config.json").exists():
        raise CompressError(f"model: {path} holds no config.json; is it a Hugging Face model folder?")
    return path


RECIPE_PICKLE_HINT = "set `allow_pickle_weights: true` in the recipe"
PICKLE_FLAG_HINT = "pass --allow-pickle-weights"  # compress score / compress eval


def _weights_error(model: str, err: Exception, allow_pickle: bool, pickle_hint: str) -> CompressError:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    hint = ""
    if not allow_pickle and "model.safetensors" in text:
        hint = (" Only safetensors weights are read by default; to load pickle (.bin) weights with "
                f"torch.load(weights_only=True), {pickle_hint}.")
    return CompressError(f"model {model!r}: cannot load its weights ({text}).{hint}")


def check_loading_info(model: str, info: dict[str, Any], num_layers: int) -> None:
    """CompressError if loading left any tensor random, unused or reshaped (transformers only warns)."""
    problems = loading_problems(info, num_layers)
    if problems:
        raise CompressError(f"model {model!r}: the weights do not match config.json: {problems} "
                            "Fix config.json or the weights (are they from the same model?)")


def load_model(model: str, *, dtype: torch.dtype, device: torch.device, revision: str | None = None,
               trust_remote_code: bool = False, device_map: str | dict | None = None,
               allow_pickle: bool = False, max_memory: dict | None = None,
               pickle_hint: str = RECIPE_PICKLE_HINT):
    """(model, tokenizer) from a hub id or local folder; safetensors weights only unless
    ``allow_pickle`` (``pickle_hint`` says how the caller turns that on). With a ``device_map``
    accelerate places the weights. A tensor missing, unexpected or of another shape is an error."""
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    from compress.quiet import auto_model_class

    AutoModelForCausalLM = auto_model_class()

    log.info("loading %s (dtype %s) onto %s%s", model, str(dtype).removeprefix("torch."),
             device_map or device, " with trust_remote_code" if trust_remote_code else "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise CompressError(f"model {model!r}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    try:
        net, info = AutoModelForCausalLM.from_pretrained(
            model, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True, device_map=device_map,
            output_loading_info=True, ignore_mismatched_sizes=True,  # mismatches reported below
            **({"max_memory": max_memory} if max_memory else {}),
        )
    except (OSError, ValueError, SafetensorError, ImportError) as e:
        raise _weights_error(model, e, allow_pickle, pickle_hint) from None
    check_loading_info(model, info, getattr(net.config, "num_hidden_layers", 0))
    return (net if device_map is not None else net.to(device)).eval(), tokenizer


def load_quantized(folder: Path, device) -> Any:
    """A quantized checkpoint (its config's quantization_config says how), placed on ``device``;
    the backend transformers imports for it (GPTQModel, bitsandbytes) is kept quiet."""
    from compress.quiet import auto_model_class, quiet_backends

    with quiet_backends():
        net, info = auto_model_class().from_pretrained(folder, device_map=str(device), output_loading_info=True)
    check_loading_info(str(folder), info, getattr(net.config, "num_hidden_layers", 0))
    return net.eval()


def estimated_weight_bytes(config, dtype: torch.dtype) -> int:
    """Bytes the model's weights take in ``dtype``, from its config alone (built on the meta device)."""
    from compress.quiet import auto_model_class

    with torch.device("meta"):
        net = auto_model_class().from_config(config)
    return sum(p.numel() for p in net.parameters()) * torch.finfo(dtype).bits // 8


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: free device memory; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return proc_kib_field("/proc/meminfo", "MemAvailable")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int) -> int | None:
    """Bytes of a size such as 70GiB, 500MB or 1024 (accelerate's max_memory notation); None if bad."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def capacity_bytes(max_memory: dict | None) -> int | None:
    """What a device_map can spread weights over: max_memory's sum, else all free GPU + CPU memory."""
    if max_memory:
        return sum(parse_size(v) or 0 for v in max_memory.values())
    total = available_bytes(torch.device("cpu"))
    if total is None:
        return None
    for i in range(torch.cuda.device_count()):
        total += torch.cuda.mem_get_info(i)[0]
    return total


def check_fits_anywhere(config, dtype: torch.dtype, max_memory: dict | None) -> int:
    """With a device_map: CompressError before loading if the weights exceed all memory allowed."""
    need = estimated_weight_bytes(config, dtype)
    room = capacity_bytes(max_memory)
    if room is not None and need > room:
        where = "max_memory allows" if max_memory else "free GPU + CPU memory is"
        raise CompressError(
            f"the model needs about {need / 2**30:.1f} GiB for its weights in "
            f"{str(dtype).removeprefix('torch.')}, but {where} {room / 2**30:.1f} GiB in all; "
            "use a smaller dtype or a machine with more memory"
        )
    return need


def check_fits(config, dtype: torch.dtype, device: torch.device) -> int:
    """CompressError before loading if the weights alone exceed the free memory of ``device``."""
    need = estimated_weight_bytes(config, dtype)
    free = available_bytes(device)
    if free is not None and need > free:
        raise CompressError(
            f"the model needs about {need / 2**30:.1f} GiB for its weights in "
            f"{str(dtype).removeprefix('torch.')}, but {device} has {free / 2**30:.1f} GiB free; "
            "use a smaller dtype, another device, or `device_map: auto` to offload"
        )
    return need


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON file written by compress; CompressError naming the file if absent or malformed."""
    if not path.exists():
        raise CompressError(f"{path.parent}: no {path.name}; {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CompressError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(CompressError):
    """A write ran out of disk space (nothing partial is left)."""


def is_disk_full(err: BaseException) -> bool:
    """A "no space left" error, also as safetensors reports it (SafetensorError "... (os error 28)")."""
    if isinstance(err, DiskFullError) or (isinstance(err, OSError) and err.errno in _DISK_FULL):
        return True
    text = str(err)
    return any(s in text for s in ("No space left on device", "os error 28", "Disk quota exceeded"))


def _size(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**20:.1f} MiB ({n} bytes)"


def disk_full_error(folder: Path, what: str, need: int | None) -> DiskFullError:
    """The message for a write that ran out of space: where, how much is free, how much was needed."""
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    needs = f"; it needs about {_size(need)}" if need else ""
    return DiskFullError(f"disk full: cannot write {what} in {folder} ({free}{needs}); nothing partial was "
                         "left. Free some space there or write to a folder on another disk, then run again")


def checkpoint_config(folder: Path, use: str) -> dict[str, Any]:
    """config.json of a local checkpoint folder, for ``use`` (e.g. "verify", "GGUF export"), read without
    transformers. CompressError naming the folder or file and what is wrong."""
    if not folder.is_dir():
        raise CompressError(f"{folder}: not a folder; {use} takes a checkpoint folder (config.json, weights, "
                            "tokenizer)")
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except OSError:
        raise CompressError(f"{folder}: has no readable config.json; is it a Hugging Face model folder?") from None
    except ValueError as e:
        raise CompressError(f"{path}: is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CompressError(f"{path}: holds {type(raw).__name__}, not a JSON object")
    return raw


def quant_method(config: dict[str, Any]) -> str | None:
    """quantization_config.quant_method of a config.json (None: a float checkpoint)."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    return str(qc.get("quant_method", "unknown")) if isinstance(qc, dict) else "unknown"


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a file (text, or bytes as they are) so that readers see the old or the new content,
    never a partial one. A write that fails leaves no temporary file; disk full or an unwritable
    place is a CompressError."""
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path.parent, path.name, len(data)) from None
        raise CompressError(f"cannot write {path}: {e.strerror or e}") from None


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder to its final name, replacing an older one only after it is complete.
    Only folders compress wrote (a run or a checkpoint) are ever removed."""
    old = final.with_name(f".old-{final.name}")
    for folder in (final, old):
        if folder.exists() and not _written_by_compress(folder):
            raise CompressError(f"{folder}: holds files that compress did not write; not replacing it "
                                "(move it away and run again)")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _written_by_compress(folder: Path) -> bool:
    """A run folder (run.json), a checkpoint (compress.json), or an empty folder."""
    if not folder.is_dir():
        return False
    return (folder / "run.json").is_file() or (folder / PROVENANCE).is_file() or not any(folder.iterdir())


def _checkpoint_bytes(model) -> int | None:
    """About what a checkpoint of ``model`` takes on disk: its weights as stored."""
    from compress.evaluate.memory import weight_bytes

    try:
        return weight_bytes(model)
    except Exception:  # an estimate for a message only
        return None


def save_checkpoint(model, tokenizer, final: Path, provenance: dict[str, Any], saver=None) -> Path:
    """Write a loadable checkpoint to ``final`` atomically (temp sibling folder + rename).
    Disk full is a CompressError naming the folder and the bytes needed; nothing partial is left."""
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
        if saver is not None:
            saver(model, tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_atomic(tmp / PROVENANCE, json.dumps(provenance, indent=2, default=str))
        crash_point("checkpoint")
        replace_dir(tmp, final)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(final.parent, f"checkpoint {final.name}", _checkpoint_bytes(model)) from None
        raise
    log.info("checkpoint written: %s", final)
    return final
