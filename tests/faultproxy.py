"""A loopback TCP fault proxy for tests, its faults named after toxiproxy's toxics.

``FaultProxy(host, port)`` listens on a free ``127.0.0.1`` port and pipes every connection
to ``host:port``. Faults switch at runtime, apply to open and new connections alike, and
take a ``direction`` where that makes sense: ``"up"`` (client to target), ``"down"``
(target to client) or ``"both"``::

    async with FaultProxy("127.0.0.1", server.port) as proxy:   # on the test's own loop
        client = redis.asyncio.Redis(port=proxy.port)
        proxy.latency(0.1, jitter=0.02)   # each way
        proxy.freeze("down")              # replies held, sockets open: a half-open peer
        proxy.thaw()
        proxy.reset_all()                 # every open connection gets an RST

    with FaultProxy("127.0.0.1", server.port) as proxy:          # on a thread of its own
        ...

Every method may be called from any thread. Standard library only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Direction = Literal["up", "down", "both"]
Chunks = asyncio.Queue[tuple[float, bytes]]  # (when it may be delivered, bytes); b"": the end


@dataclass
class _Toxics:
    """The faults of one direction."""

    latency: float = 0.0
    jitter: float = 0.0
    frozen: bool = False
    limit: int | None = None
    flowing: asyncio.Event | None = None  # set unless frozen; made on the proxy's loop


@dataclass(eq=False)
class _Conn:
    """One proxied connection: where each direction writes, and what it may still send."""

    writers: dict[str, asyncio.StreamWriter]
    budget: dict[str, int | None]
    killed: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self, *, reset: bool = False) -> None:
        for writer in self.writers.values():
            _abort(writer) if reset else writer.close()
        self.killed.set()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, not a FIN."""
    with contextlib.suppress(OSError, AttributeError):
        linger = struct.pack("ii", 1, 0)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    writer.transport.abort()


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:port`` to ``target_host:target_port`` with faults.

    Counters: ``accepted`` connections, ``sent["up"]``/``sent["down"]`` bytes delivered,
    ``open_connections``. Start it with ``async with`` (or ``await start()``, ``aclose()``)
    on a running loop, or with ``with`` (``start_in_thread()``, ``stop()``) on a thread.
    """

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host, self.port = "127.0.0.1", port
        self.accepted = 0
        self.sent = {"up": 0, "down": 0}
        self._dirs = {"up": _Toxics(), "down": _Toxics()}
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def url(self, scheme: str = "redis", path: str = "/0") -> str:
        """The proxy's address as a URL, e.g. ``redis://127.0.0.1:PORT/0``."""
        return f"{scheme}://{self.host}:{self.port}{path}"

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # --- faults ----------------------------------------------------------------------
    def latency(self, seconds: float, jitter: float = 0.0, direction: Direction = "both") -> None:
        """Delay every chunk by ``seconds`` ± ``jitter`` (order kept); 0 removes it."""
        self._set(direction, latency=seconds, jitter=jitter)

    def freeze(self, direction: Direction = "both") -> None:
        """Hold every byte (and every close) while keeping the sockets open: a blackhole."""
        self._set(direction, frozen=True)

    def thaw(self, direction: Direction = "both") -> None:
        """Deliver what ``freeze`` held, and flow again."""
        self._set(direction, frozen=False)

    def limit_data(self, n: int | None, direction: Direction = "down") -> None:
        """Close each connection once ``n`` more bytes went ``direction`` (e.g. mid-reply);
        ``None`` lifts the limit."""
        self._set(direction, limit=n)

    def reset_all(self) -> None:
        """RST every open connection, both sides (new ones are still accepted)."""
        self._do(lambda: self._close_all(reset=True))

    def drop_all(self) -> None:
        """Close every open connection cleanly, both sides; held bytes are discarded."""
        self._do(self._close_all)

    def down(self) -> None:
        """Stop listening: new connections are refused; open ones carry on."""
        self._do(self._unlisten)

    def up(self) -> None:
        """Listen again, on the same port."""
        self._do(self._listen)

    def heal(self) -> None:
        """Remove every fault: no latency, nothing frozen, no limit, listening."""
        self._set("both", latency=0.0, jitter=0.0, frozen=False, limit=None)
        self.up()

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> FaultProxy:
        """Listen, serving on the running loop; ``port`` is known once this returns."""
        self._loop = asyncio.get_running_loop()
        for toxics in self._dirs.values():
            toxics.flowing = asyncio.Event()
            if not toxics.frozen:
                toxics.flowing.set()
        self._listen()
        return self

    async def aclose(self) -> None:
        """Stop listening, reset every connection and end every task. Idempotent."""
        self._unlisten()
        self._close_all(reset=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def start_in_thread(self) -> FaultProxy:
        """Serve from a loop on a daemon thread; return once listening."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop = asyncio.new_event_loop()

        def run() -> None:
            try:
                loop.run_until_complete(self.start())
                ready.set_result(None)
                loop.run_forever()
                loop.run_until_complete(self.aclose())
            except BaseException as exc:  # start failed: tell the starting thread
                if not ready.done():
                    ready.set_exception(exc)
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        ready.result(10)
        return self

    def stop(self) -> None:
        """Stop a proxy started by ``start_in_thread``: close everything, join the thread."""
        thread, self._thread = self._thread, None
        if thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            thread.join(10)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __enter__(self) -> FaultProxy:
        return self.start_in_thread()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- internals -------------------------------------------------------------------
    def _do(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the proxy's loop (at once, if we are on it) and wait for it."""
        loop = self._loop
        if loop is None or loop.is_closed() or _running_loop() is loop:
            fn()
        else:

            async def run() -> None:
                fn()

            asyncio.run_coroutine_threadsafe(run(), loop).result(10)

    def _set(self, direction: Direction, **values: object) -> None:
        def apply() -> None:
            for name in ("up", "down") if direction == "both" else (direction,):
                toxics = self._dirs[name]
                for attr, value in values.items():
                    setattr(toxics, attr, value)
                if toxics.flowing is not None:
                    (toxics.flowing.clear if toxics.frozen else toxics.flowing.set)()
                for conn in self._conns if "limit" in values else ():
                    conn.budget[name] = toxics.limit

        self._do(apply)

    def _close_all(self, *, reset: bool = False) -> None:
        for conn in list(self._conns):
            conn.close(reset=reset)

    def _listen(self) -> None:
        if self._loop is None or self._listener is not None:
            return
        sock = socket.create_server((self.host, self.port), backlog=512)  # SO_REUSEADDR
        sock.setblocking(False)
        self.port, self._listener = sock.getsockname()[1], sock
        self._loop.add_reader(sock, self._accept)

    def _unlisten(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)
            sock.close()

    def _accept(self) -> None:
        while self._listener is not None and self._loop is not None:
            try:
                client, _ = self._listener.accept()
            except OSError:  # BlockingIOError: no more waiting
                return
            client.setblocking(False)
            self.accepted += 1
            task = self._loop.create_task(self._serve(client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, client: socket.socket) -> None:
        try:
            c_reader, c_writer = await asyncio.open_connection(sock=client)
        except BaseException:
            client.close()
            raise
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except BaseException as exc:  # the target is down (or we are closing)
            _abort(c_writer)
            if isinstance(exc, OSError):
                return
            raise
        conn = _Conn(
            {"up": s_writer, "down": c_writer}, {n: t.limit for n, t in self._dirs.items()}
        )
        self._conns.add(conn)
        queues: dict[str, Chunks] = {"up": asyncio.Queue(256), "down": asyncio.Queue(256)}
        readers = [
            asyncio.create_task(self._read(name, reader, queues[name]))
            for name, reader in (("up", c_reader), ("down", s_reader))
        ]
        # It ends when one direction delivered its end (or was cut), or when killed.
        enders: list[asyncio.Task[Any]] = [
            asyncio.create_task(self._deliver(conn, n, queues[n])) for n in ("up", "down")
        ]
        enders.append(asyncio.create_task(conn.killed.wait()))
        try:
            await asyncio.wait(enders, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._conns.discard(conn)
            conn.close()
            for task in readers + enders:
                task.cancel()
            await asyncio.gather(*readers, *enders, return_exceptions=True)

    async def _read(self, name: str, reader: asyncio.StreamReader, queue: Chunks) -> None:
        loop, due = asyncio.get_running_loop(), 0.0
        data = b"-"
        while data:
            try:
                data = await reader.read(65536)
            except OSError:
                data = b""
            toxics = self._dirs[name]
            delay = toxics.latency + random.uniform(-toxics.jitter, toxics.jitter)
            due = max(due, loop.time() + max(0.0, delay))  # never reorder bytes
            await queue.put((due, data))

    async def _deliver(self, conn: _Conn, name: str, queue: Chunks) -> None:
        loop, writer, toxics = asyncio.get_running_loop(), conn.writers[name], self._dirs[name]
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            assert toxics.flowing is not None
            await toxics.flowing.wait()
            left = conn.budget[name]
            if left is not None:
                data = data[:left]
                conn.budget[name] = left - len(data)
            if not data:
                return  # the end, or the limit reached
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                return
            self.sent[name] += len(data)
            if conn.budget[name] == 0:
                return
