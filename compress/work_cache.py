"""Work shared between the runs of a sweep: pure computations kept on disk under a key made of
everything they depend on, so the next run that needs the same thing reads it instead.

A ``WorkCache`` has a *scope* (what is fixed for every computation under it: the input model's
identity, dtype, device, the stages already applied) and computes each ``(what, inputs)`` once:
the first caller computes and writes it (atomically, under an exclusive lock per key, so two
processes of a Ray sweep never compute it twice), every later caller reads it. ``events`` lists what
this process got and whether it was read (``hit``) or computed. ``compress run`` uses no cache; the
sweep (compress.sweep) gives every node's pipeline one folder for the whole sweep.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def tensor_digest(batches: Any) -> str:
    """sha256 of tensors (a tensor, or lists/dicts of them, in order): the data a computation saw."""
    h = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, dict):
            for k in sorted(value):
                h.update(str(k).encode())
                walk(value[k])
        elif isinstance(value, (list, tuple)):
            h.update(f"[{len(value)}".encode())
            for v in value:
                walk(v)
        else:
            h.update(repr(value).encode())

    walk(batches)
    return h.hexdigest()


def file_stamp(path: str | Path | None) -> list[Any] | None:
    """(size, mtime_ns) of a local data file or of every file in a folder: a changed file changes
    the key. None for no path."""
    if path is None:
        return None
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return [[str(q), q.stat().st_size, q.stat().st_mtime_ns] for q in files if q.exists()]


@dataclass
class WorkCache:
    folder: Path
    scope: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)

    def scoped(self, **more: Any) -> "WorkCache":
        """The same folder with more fixed inputs (e.g. the stages applied so far); shares events."""
        return WorkCache(self.folder, {**self.scope, **more}, self.events)

    def key(self, what: str, inputs: dict[str, Any]) -> str:
        text = json.dumps({"what": what, "scope": self.scope, "inputs": inputs}, sort_keys=True, default=str)
        return f"{what}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"

    def json(self, what: str, inputs: dict[str, Any], compute: Callable[[], Any]) -> Any:
        """``compute()`` (a JSON value) once per key."""
        return self._get(what, inputs, compute, ".json",
                         lambda v: json.dumps(v).encode(), lambda b: json.loads(b.decode()))

    def tensors(self, what: str, inputs: dict[str, Any], compute: Callable[[], Any]) -> Any:
        """``compute()`` (tensors, or lists/dicts of them) once per key."""
        def dump(value: Any) -> bytes:
            buffer = io.BytesIO()
            torch.save(value, buffer)
            return buffer.getvalue()

        return self._get(what, inputs, compute, ".pt", dump,
                         lambda b: torch.load(io.BytesIO(b), weights_only=True))

    def _get(self, what, inputs, compute, suffix, dump, load) -> Any:
        from compress.model_io import write_atomic

        key = self.key(what, inputs)
        path = self.folder / f"{key}{suffix}"
        with _locked(self.folder / f".{key}.lock"):
            if path.exists():
                self.events.append({"what": what, "key": key, "hit": True})
                return load(path.read_bytes())
            value = compute()
            write_atomic(path, dump(value))
            write_atomic(self.folder / f"{key}.inputs.json",
                         json.dumps({"what": what, "scope": self.scope, "inputs": inputs}, indent=1, default=str))
        self.events.append({"what": what, "key": key, "hit": False})
        return value


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits: another process is computing this very key
        yield
    finally:
        os.close(fd)
