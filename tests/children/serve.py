"""Child process: serve an ASGI app with uvicorn on a free loopback port.

Usage: python serve.py module:attribute [graceful_seconds]. Binds port 0 itself (no race
for a port), prints ``listening <port>``, then runs uvicorn, which handles SIGTERM: stop
accepting, wait for open requests (at most ``graceful_seconds``), run lifespan shutdown.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
import sys

import uvicorn


def main() -> None:
    module, _, attribute = sys.argv[1].partition(":")
    graceful = float(sys.argv[2]) if len(sys.argv) > 2 else None
    app = getattr(importlib.import_module(module), attribute)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", timeout_graceful_shutdown=graceful
    )
    server = uvicorn.Server(config)
    print(f"listening {sock.getsockname()[1]}", flush=True)
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main()
