"""Fault injection for crash-and-resume tests.

``COMPRESS_CRASH_AT=<point>[:N]`` makes the process signal itself the N-th time (default 1st) it
reaches that point (SIGKILL by default, ``COMPRESS_CRASH_SIGNAL=INT`` for Ctrl-C, ``STOP`` to freeze
it there until SIGCONT, as a second process racing the first would find it). Points:
``scoring`` (after a calibration batch), ``stage`` (a stage applied, its record not yet stored),
``evaluation`` (a perplexity evaluation finished, not yet stored), ``checkpoint`` (weights written
to the temporary folder, not yet renamed), ``heal`` (a heal training checkpoint written). Unset in normal use: then every call is a no-op.
"""

from __future__ import annotations

import os
import signal

POINTS = ("scoring", "stage", "checkpoint", "evaluation", "heal")


_SEEN: dict[str, int] = {}


def crash_point(name: str) -> None:
    target = os.environ.get("COMPRESS_CRASH_AT")
    if not target or target.split(":")[0] != name:
        return
    _SEEN[name] = _SEEN.get(name, 0) + 1
    if _SEEN[name] != int(target.partition(":")[2] or 1):
        return
    sig = {"INT": signal.SIGINT, "STOP": signal.SIGSTOP}.get(os.environ.get("COMPRESS_CRASH_SIGNAL", ""),
                                                             signal.SIGKILL)
    os.kill(os.getpid(), sig)
