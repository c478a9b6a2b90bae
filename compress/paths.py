"""Checks on the paths a command is given, made before any work starts.

Inputs must be regular files (or folders of them): a FIFO or a device such as /dev/zero could block
forever or never end. Outputs must be creatable, of the right kind (file or folder), and never
inside the input model folder, which compress only ever reads.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from compress.errors import CompressError


def kind(path: Path) -> str:
    """What ``path`` is, in words: "a folder", "a file", "a FIFO", "a device", ... or "absent"."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "absent"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (symlinks followed); CompressError naming ``what`` otherwise."""
    found = kind(path)
    if found == "absent":
        raise CompressError(f"{what}: {path} does not exist")
    if found != "a file":
        raise CompressError(f"{what}: {path} is {found}; only regular files are read")
    return path


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_creatable(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable folder."""
    ancestor = path.resolve().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CompressError(f"{option}: cannot create {path}: {ancestor} is {kind(ancestor)}, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CompressError(f"{option}: cannot create {path}: {ancestor} is not writable")


def _check_not_input(path: Path, option: str, inputs: list[Path]) -> None:
    for folder in inputs:
        if _inside(path, folder):
            raise CompressError(f"{option}: {path} is inside the input model folder {folder}; compress never "
                                "writes into the input model folder: choose another place")


def output_folder(path: Path, option: str, inputs: list[Path] = ()) -> Path:
    """``path`` if it can be used (or created) as an output folder; CompressError otherwise."""
    _check_not_input(path, option, list(inputs))
    found = kind(path)
    if found == "a folder":
        if not os.access(path, os.W_OK | os.X_OK):
            raise CompressError(f"{option}: folder {path} is not writable")
        return path
    if found != "absent":
        raise CompressError(f"{option}: {path} is {found}; give a folder (it is created if absent)")
    _check_creatable(path, option)
    return path


def output_file(path: Path, option: str, inputs: list[Path] = ()) -> Path:
    """``path`` if it can be written as a file (an existing regular file is replaced)."""
    _check_not_input(path, option, list(inputs))
    found = kind(path)
    if found == "a folder":
        raise CompressError(f"{option}: {path} is a folder; give a file name, e.g. {path / 'row.json'}")
    if found not in ("absent", "a file"):
        raise CompressError(f"{option}: {path} is {found}; give a regular file name")
    _check_creatable(path, option)
    return path
