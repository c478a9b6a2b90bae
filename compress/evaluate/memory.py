"""Model size and peak memory: parameter count, bytes of weights as stored, peak memory of a step.

Peak memory is the accelerator's allocator peak on CUDA, and the process peak resident set
(VmHWM, reset through /proc/self/clear_refs) on CPU."""

from __future__ import annotations

from pathlib import Path

import torch


def parameter_count(model) -> int:
    """Logical parameter count: packed quantized weights count the weights they hold, not their
    storage (bitsandbytes 4-bit parameters; GPTQ ``qweight`` buffers of in x out weights)."""
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += int(torch.Size(shape).numel()) if shape is not None else p.numel()
    for module in model.modules():
        if hasattr(module, "qweight") and hasattr(module, "in_features") and not isinstance(module.qweight, torch.nn.Parameter):
            total += module.in_features * module.out_features
    return total


def weight_bytes(model) -> int:
    """Bytes of every tensor in the state dict as stored (tied tensors counted once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def proc_kib_field(path: str, key: str) -> int | None:
    """Bytes of a ``key: N kB`` line of a /proc file (Linux), None where there is none."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Context manager measuring the peak memory of the enclosed code on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to current RSS
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = proc_kib_field("/proc/self/status", "VmHWM")
