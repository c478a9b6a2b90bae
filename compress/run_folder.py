"""The run folder: where a run may write, who holds it, and which recipe *and model* it belongs to.

A run never deletes or changes its inputs, whatever ``output`` and ``--overwrite`` say:

* ``output`` may not be, contain, or lie inside the input model folder, a data file or folder, or
  the hub cache; nor be or contain the recipe's own folder (``output_conflicts``, checked by the
  recipe before anything runs, so ``compress validate`` reports it too).
* ``--overwrite`` replaces only a folder that compress wrote (it holds ``run.json``); a non-empty
  folder of anything else is refused with or without it (``choose_work_folder``).
* One run at a time per output: an exclusive ``flock`` on ``.<name>.lock`` beside the folder
  (``hold_run_lock``); the kernel drops it when the process dies, even on SIGKILL.
* ``run.json`` records the recipe's fingerprint and the input model's identity (local: sha256 of
  its files; hub: the resolved commit); a rerun resumes only when both are unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compress.errors import CompressError

RUN_FILE = "run.json"


def output_conflicts(output: Path, model_dir: Path | None, recipe_dir: Path,
                     data: dict[str, Path]) -> list[str]:
    """Why ``output`` would put an input at risk (empty if it would not). Paths are absolute.

    ``data``: key path in the recipe (e.g. ``calibration.path``) -> a file or folder the run reads."""
    inputs: list[tuple[str, Path, bool]] = []  # (what, path, may the output lie inside it?)
    if model_dir is not None:
        inputs.append((f"input model folder {model_dir}", model_dir, False))
    else:
        inputs.append((f"Hugging Face cache {_hub_cache()}", _hub_cache(), False))
    inputs.append((f"recipe's own folder {recipe_dir}", recipe_dir, True))
    inputs += [(f"{key} {path}", path, False) for key, path in data.items()]
    problems = []
    for what, path, inside_ok in inputs:
        if output == path:
            problems.append(f"output: {output} is the {what}; a run replaces its output folder, "
                            "so choose a new or empty folder elsewhere")
        elif output in path.parents:
            problems.append(f"output: {output} contains the {what}; a run replaces its output folder, "
                            "so choose a folder that holds none of the run's inputs")
        elif not inside_ok and path in output.parents:
            problems.append(f"output: {output} is inside the {what}; a run never writes into its "
                            "inputs, so choose a folder outside it")
    return problems


def _hub_cache() -> Path:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return Path("~/.cache/huggingface/hub").expanduser().resolve()
    return Path(HF_HUB_CACHE).expanduser().resolve()


@contextlib.contextmanager
def hold_run_lock(output: Path) -> Iterator[Path]:
    """Exclusive lock for runs into ``output`` (a ``.<name>.lock`` file beside it), or CompressError
    at once if another run holds it. The lock file stays; the lock dies with the process."""
    output.parent.mkdir(parents=True, exist_ok=True)
    lock = output.with_name(f".{output.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise CompressError(
                f"output: another compress run (pid {holder}) holds {output} (lock {lock}); wait for "
                "it to finish, or choose another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        os.close(fd)  # releases the flock


def read_run_file(folder: Path) -> dict[str, Any] | None:
    """The folder's run.json, None if it has none; CompressError if it is unreadable."""
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompressError(f"{path}: unreadable run record ({e}); move the folder away or choose "
                            "another output") from None
    if not isinstance(data, dict):
        raise CompressError(f"{path}: not a run record (expected a JSON object)")
    return data


def _foreign_sample(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _mismatch(run: dict[str, Any], fingerprint: str, identity: dict[str, Any]) -> str | None:
    """Why an existing run record is not this run's; None if it is."""
    if run.get("fingerprint") != fingerprint:
        return f"holds a run of another recipe ({run.get('recipe', '?')})"
    if run.get("model_identity") != identity:
        return (f"holds a run of this recipe on other model files (recorded {run.get('model_identity')}, "
                f"now {identity}): the input model changed since, so its results cannot be resumed")
    return None


def output_status(output: Path, fingerprint: str) -> str:
    """What ``run`` will do with ``output`` (for ``compress validate``, which reads no weights);
    CompressError where ``run`` would refuse it whatever the model."""
    if output.exists() and not output.is_dir():
        raise CompressError(f"output: {output} exists and is not a folder; choose a folder path")
    if not output.exists() or not any(output.iterdir()):
        return "new run"
    run = read_run_file(output)
    if run is None:
        raise CompressError(
            f"output: {output} holds files that compress did not write ({_foreign_sample(output)}); "
            "compress never deletes those, even with --overwrite: choose a new or empty folder"
        )
    if run.get("fingerprint") != fingerprint:
        return f"holds a run of another recipe ({run.get('recipe', '?')}): `run` needs --overwrite"
    return "resumes the run there if the model files are unchanged"


def choose_work_folder(output: Path, fingerprint: str, identity: dict[str, Any], overwrite: bool) -> Path:
    """The folder to write into: ``output`` itself (new, empty, or this run's to resume), or with
    ``--overwrite`` ``.<name>.new`` beside it, swapped in once complete. Never removes anything
    compress did not write."""
    if output_status(output, fingerprint) == "new run":
        return output
    run = read_run_file(output)
    assert run is not None  # output_status refused a folder without one
    why = _mismatch(run, fingerprint, identity)
    if why is None:
        return output
    if not overwrite:
        raise CompressError(f"output: {output} {why}; choose another output folder, or pass --overwrite "
                            "to replace it once the new run completes")
    work = output.with_name(f".{output.name}.new")
    if work.exists() and any(work.iterdir()):
        prior = read_run_file(work)
        if prior is None:
            raise CompressError(f"output: {work} (where --overwrite builds the new run) holds files that "
                                f"compress did not write ({_foreign_sample(work)}); move them away")
        if _mismatch(prior, fingerprint, identity) is not None:
            shutil.rmtree(work)  # an interrupted --overwrite of another run: compress's own
    return work


def start_run_folder(work: Path, fingerprint: str, recipe_path: Path, identity: dict[str, Any]) -> None:
    """Create ``work`` with its run.json (kept if present) and drop a killed checkpoint write's
    leftovers (safe: the caller holds the run lock)."""
    from compress.model_io import write_atomic

    work.mkdir(parents=True, exist_ok=True)
    for stale in [*work.glob("checkpoints/.tmp-*"), *work.glob("checkpoints/.old-*"), *work.glob("state/.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    if read_run_file(work) is None:
        import time

        write_atomic(work / RUN_FILE, json.dumps({"fingerprint": fingerprint, "recipe": str(recipe_path),
                                                  "model_identity": identity, "created": time.time()},
                                                 indent=2))


def model_identity(source: dict[str, Any]) -> dict[str, Any]:
    """What identifies the input model's weights: local files' sha256, or the hub commit."""
    if source.get("content_sha256"):
        return {"model": source["model"], "content_sha256": source["content_sha256"]}
    return {"model": source["model"], "revision": source.get("revision"), "commit": source.get("commit")}
