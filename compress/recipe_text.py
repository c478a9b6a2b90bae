"""Reading a recipe file safely, and expanding ``${VAR}`` in its strings.

A recipe comes from a user, so nothing in it may hang the process or end in a traceback:
``read_yaml`` reads only regular files of at most ``MAX_BYTES``, and measures the document from
PyYAML's event stream (which is iterative) before building it: more than ``MAX_DEPTH`` levels of
nesting, more than ``MAX_NODES`` values once every ``*alias`` is expanded ("billion laughs"), or an
alias used inside its own anchor are refused with one message. ``expand`` then expands each shared
(aliased) node once and keeps it shared.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from compress.errors import CompressError

MAX_BYTES = 1 << 20  # 1 MiB: recipes are a few hundred bytes
MAX_DEPTH = 100  # nesting levels; recipes use about 5, and every later step recurses per level
MAX_NODES = 100_000  # values (keys included) after expanding aliases
MAX_ENV_NESTING = 20  # ${A:-${B:-...}} levels

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REF_OR_CLOSE = re.compile(r"\$\{|\}")
_REF = re.compile(r"\$\{")


def read_yaml(path: Path) -> Any:
    """The parsed YAML of the recipe file, or CompressError naming the file."""
    text = _read_text(path)
    if not text.strip():
        raise CompressError(f"{path}: the recipe is empty; see README 'Recipe reference'")
    try:
        _check_shape(yaml.parse(text, Loader=yaml.SafeLoader), path)
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise CompressError(f"{path}: not valid YAML{line}: {getattr(e, 'problem', e)}") from None
    except CompressError:
        raise
    except Exception as e:  # noqa: BLE001 -- PyYAML's constructors fail on values they cannot build
        # with ValueError (a 5,000-digit int, 2001-13-45), KeyError (!!bool maybe), AttributeError
        # (!!timestamp x), ...
        reason = str(e).split(";")[0] if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise CompressError(f"{path}: not valid YAML: a value cannot be read ({reason}); "
                            "quote it to keep it as text") from None


def _read_text(path: Path) -> str:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CompressError(f"{path}: recipe file not found") from None
    except (OSError, ValueError) as e:  # permission, name too long, NUL in the name
        raise CompressError(f"{path}: cannot read the recipe ({e})") from None
    if stat.S_ISDIR(info.st_mode):
        raise CompressError(f"{path}: is a directory; give the recipe's .yaml file")
    if not stat.S_ISREG(info.st_mode):
        raise CompressError(f"{path}: is not a regular file (a pipe, device or socket); "
                            "give the recipe's .yaml file")
    too_large = CompressError(f"{path}: the recipe is larger than {MAX_BYTES} bytes (1 MiB); "
                              "a recipe is a short YAML file")
    if info.st_size > MAX_BYTES:
        raise too_large
    try:
        # O_NONBLOCK: should the path have become a pipe since stat, open does not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CompressError(f"{path}: is not a regular file; give the recipe's .yaml file")
            data = f.read(MAX_BYTES + 1)  # bounded: some files (/proc) report size 0
        if len(data) > MAX_BYTES:
            raise too_large
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CompressError(f"{path}: cannot read the recipe ({e})") from None


def _check_shape(events, path: Path) -> None:
    """Refuse a document nested deeper than MAX_DEPTH or of more than MAX_NODES values with its
    aliases expanded, from the event stream alone (nothing is built, nothing recurses)."""
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (values, height) of its node
    open_: list[list] = []  # collections being read: [anchor, values so far, highest child]
    total = 0
    for event in events:
        if isinstance(event, yaml.CollectionStartEvent):
            open_.append([event.anchor, 1, 0])
            size, height = 1, 0
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, size, child = open_.pop()
            if anchor is not None:
                anchors[anchor] = (size, child + 1)
            if open_:
                open_[-1][1] += size
                open_[-1][2] = max(open_[-1][2], child + 1)
            continue
        elif isinstance(event, yaml.AliasEvent):
            if any(frame[0] == event.anchor for frame in open_):
                raise CompressError(f"{path}: the alias *{event.anchor} is used inside its own anchor "
                                    f"&{event.anchor}; a recipe cannot contain itself")
            size, height = anchors.get(event.anchor, (1, 0))  # undefined: safe_load reports it
        elif isinstance(event, yaml.ScalarEvent):
            size, height = 1, 0
            if event.anchor is not None:
                anchors[event.anchor] = (1, 0)
        else:
            continue
        total += size
        if total > MAX_NODES:
            raise CompressError(f"{path}: the recipe is too large: more than {MAX_NODES} values once its "
                                "*aliases are expanded (too many aliases, or too many entries)")
        if len(open_) + height > MAX_DEPTH:
            raise CompressError(f"{path}: the recipe is nested too deeply (max depth {MAX_DEPTH})")
        if open_ and not isinstance(event, yaml.CollectionStartEvent):
            open_[-1][1] += size
            open_[-1][2] = max(open_[-1][2], height)


def expand(data: Any, errors: list[str]) -> Any:
    """``data`` with ``${VAR}``, ``${VAR:-default}`` (defaults may nest) expanded in every string.
    A node reached through several aliases is expanded once and stays shared. Problems are
    appended to ``errors`` as ``key.path: ...``."""
    done: dict[int, Any] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, (dict, list)) and id(value) in done:
            return done[id(value)]
        if isinstance(value, dict):
            out: dict = done.setdefault(id(value), {})
            for k, v in value.items():
                out[k] = walk(v, f"{key}.{k}" if key else str(k))
            return out
        if isinstance(value, list):
            items: list = done.setdefault(id(value), [])
            items.extend(walk(v, f"{key}[{i}]") for i, v in enumerate(value))
            return items
        if isinstance(value, str):
            return expand_string(value, key or "(top level)", errors)
        return value

    return walk(data, "")


class _Malformed(Exception):
    pass


def expand_string(text: str, key: str, errors: list[str]) -> str:
    """Expand one string. Values of variables are inserted as they are (not expanded again)."""
    if "${" not in text:
        return text
    try:
        out, _ = _scan(text, 0, 0, errors, key, closing=False)
    except _Malformed as e:
        shown = text if len(text) <= 80 else text[:77] + "..."
        errors.append(f"{key}: {e} in {shown!r}; write ${{VAR}} or ${{VAR:-default}} "
                      "(VAR: letters, digits and _, not starting with a digit)")
        return text
    return out


def _scan(text: str, i: int, depth: int, errors: list[str], key: str, closing: bool) -> tuple[str, int]:
    """Expand ``text`` from ``i`` to its end, or (``closing``) to the ``}`` that ends the default
    being read. Returns the expansion and the index after what was read."""
    out = []
    stop = _REF_OR_CLOSE if closing else _REF
    while (m := stop.search(text, i)) is not None:
        out.append(text[i : m.start()])
        if m.group() == "}":
            return "".join(out), m.end()
        value, i = _reference(text, m.end(), depth + 1, errors, key)
        out.append(value)
    if closing:
        raise _Malformed("an unclosed ${")
    out.append(text[i:])
    return "".join(out), len(text)


def _reference(text: str, i: int, depth: int, errors: list[str], key: str) -> tuple[str, int]:
    """The value of the reference whose name starts at ``i`` (just after ``${``)."""
    if depth > MAX_ENV_NESTING:
        raise _Malformed(f"${{...}} nested more than {MAX_ENV_NESTING} deep")
    name = _NAME.match(text, i)
    if name is None:
        raise _Malformed("a ${ not followed by a variable name")
    i = name.end()
    default, default_errors = None, []
    if text.startswith(":-", i):
        default, i = _scan(text, i + 2, depth, default_errors, key, closing=True)
    elif text.startswith("}", i):
        i += 1
    else:
        raise _Malformed(f"${{{name.group()} not followed by }} or :-default}}")
    value = os.environ.get(name.group(), "")
    if value:
        return value, i
    if default is not None:
        errors.extend(default_errors)  # inner ${B} unset matters only when the default is used
        return default, i
    errors.append(f"{key}: environment variable ${{{name.group()}}} is not set "
                  f"(set it, or write ${{{name.group()}:-default}})")
    return f"${{{name.group()}}}", i
