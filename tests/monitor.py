"""A real ``MONITOR`` client on a raw socket: records every command a server executes,
with the client address, so tests can count round trips per call."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from dataclasses import dataclass

from dedupcall.scripts import NAMES, source

LINE = re.compile(r"^\+(?P<ts>[\d.]+) \[(?P<db>\d+) (?P<client>[^\]]+)\] (?P<args>.*)$")
SHA_TO_SCRIPT = {hashlib.sha1(source(n).encode()).hexdigest(): n for n in NAMES}


@dataclass(frozen=True)
class Command:
    client: str
    name: str  # the command, or "script:<name>" for EVALSHA of one of ours

    @property
    def from_lua(self) -> bool:
        return self.client == "lua"


class Monitor:
    """``with Monitor(port) as m: ...; m.commands()`` — commands seen since ``mark()``."""

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.sendall(b"MONITOR\r\n")
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._buffer = b""
        self._thread.start()
        # a second connection of ours for markers, excluded from what we report
        self._marker = socket.create_connection(("127.0.0.1", port))
        host, port_ = self._marker.getsockname()[:2]
        self._marker_addr = f"{host}:{port_}"

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
        self._marker.close()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self._buffer += data
            *lines, self._buffer = self._buffer.split(b"\r\n")
            with self._lock:
                self._lines.extend(line.decode("utf-8", "replace") for line in lines)

    def mark(self, label: str) -> None:
        """Put a marker in the stream and wait until MONITOR has shown it."""
        self._marker.sendall(f"ECHO {label}\r\n".encode())
        self._marker.recv(1024)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with self._lock:
                if any(f'"{label}"' in line for line in self._lines):
                    return
            time.sleep(0.005)
        raise AssertionError(f"marker {label} never seen by MONITOR")

    def query(self, *args: str) -> bytes:
        """Run a command on the marker connection (not counted); its raw reply line."""
        frame = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        self._marker.sendall(frame.encode())
        return self._marker.recv(65536)

    def between(self, start: str, end: str) -> list[Command]:
        """Commands from clients (not Lua, not markers) between two markers."""
        with self._lock:
            lines = list(self._lines)
        begin = next(i for i, line in enumerate(lines) if f'"{start}"' in line)
        finish = next(i for i, line in enumerate(lines) if f'"{end}"' in line)
        out = []
        for line in lines[begin + 1 : finish]:
            match = LINE.match(line)
            if not match or match["client"] == self._marker_addr:
                continue
            args = re.findall(r'"((?:[^"\\]|\\.)*)"', match["args"])
            name = args[0].upper() if args else "?"
            if name == "EVALSHA":
                name = "script:" + SHA_TO_SCRIPT.get(args[1], "unknown")
            out.append(Command(match["client"], name))
        return [c for c in out if not c.from_lua]
