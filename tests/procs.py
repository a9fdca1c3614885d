"""Real separate Python processes for tests (the ``spawn`` fixture), and no orphans.

``Spawner`` starts ``python <script> args...`` with the repository root on PYTHONPATH and
unbuffered output. Each child runs in its own process group; ``close()`` (fixture
teardown) kills every group still alive and prints each child's stderr, which pytest
shows for a failed test. Scripts named without a folder are looked up in
``tests/children/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
CHILDREN_DIR = TESTS_DIR / "children"


class Proc:
    """One running child process; its output is read continuously, so pipes never fill."""

    def __init__(self, argv: list[str], popen: subprocess.Popen[str]) -> None:
        self.argv = argv
        self.popen = popen
        self._lines: list[str] = []
        self._stderr: list[str] = []
        self._changed = threading.Condition()
        assert popen.stdout is not None and popen.stderr is not None
        self._readers = [
            threading.Thread(target=self._pump, args=(popen.stdout, self._lines), daemon=True),
            threading.Thread(target=self._pump, args=(popen.stderr, self._stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def stdout(self) -> str:
        """Everything printed to stdout so far."""
        with self._changed:
            return "".join(self._lines)

    @property
    def stderr(self) -> str:
        """Everything printed to stderr so far."""
        with self._changed:
            return "".join(self._stderr)

    def wait(self, timeout: float = 60.0) -> tuple[int, str, str]:
        """Wait for the exit; return ``(returncode, stdout, stderr)``.

        Raises ``TimeoutError`` (with the stderr so far) if it is still running.
        """
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"{self._name()} still running after {timeout}s; stderr:\n{self.stderr}"
            ) from None
        for reader in self._readers:
            reader.join(timeout)
        return code, self.stdout, self.stderr

    def wait_line(self, text: str, timeout: float = 30.0, *, stderr: bool = False) -> str:
        """Wait until a stdout (or ``stderr``) line contains ``text`` (e.g. a "ready"
        marker); return it."""
        deadline = time.monotonic() + timeout
        lines = self._stderr if stderr else self._lines
        with self._changed:
            while True:
                for line in lines:
                    if text in line:
                        return line.rstrip("\n")
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reading()):
                    raise TimeoutError(
                        f"{self._name()} printed no line with {text!r} "
                        f"(exit code {self.popen.poll()}); stdout:\n{''.join(self._lines)}"
                        f"\nstderr:\n{''.join(self._stderr)}"
                    )
                self._changed.wait(min(left, 0.5))

    def json(self, timeout: float = 60.0) -> Any:
        """Wait for the exit and parse the last non-empty stdout line as JSON."""
        code, out, err = self.wait(timeout)
        lines = [line for line in out.splitlines() if line.strip()]
        try:
            return json.loads(lines[-1])
        except (IndexError, ValueError):
            raise AssertionError(
                f"{self._name()} (exit {code}) printed no JSON last line; "
                f"stdout:\n{out}\nstderr:\n{err}"
            ) from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the child (default SIGKILL, i.e. a crash)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)

    def _kill_group(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def _pump(self, stream: IO[str], sink: list[str]) -> None:
        for line in stream:
            with self._changed:
                sink.append(line)
                self._changed.notify_all()
        stream.close()
        with self._changed:
            self._changed.notify_all()

    def _reading(self) -> bool:
        return any(reader.is_alive() for reader in self._readers)

    def _name(self) -> str:
        return f"child {self.popen.pid} ({' '.join(self.argv[1:])})"


class Spawner:
    """Starts child processes and guarantees none outlive ``close()``."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def __call__(
        self,
        script: str | os.PathLike[str],
        *args: object,
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        """Run ``python <script> *args``; a bare name is looked up in ``tests/children``."""
        path = Path(script)
        if not path.is_absolute() and not path.exists():
            path = CHILDREN_DIR / path
            if path.suffix != ".py":
                path = path.with_suffix(".py")
        if not path.is_file():
            raise FileNotFoundError(f"no child script {script!r} (looked at {path})")
        return self._start([str(path)], args, env)

    def module(self, name: str, *args: object, env: Mapping[str, str] | None = None) -> Proc:
        """Run ``python -m <name> *args`` (e.g. ``spawn.module("dedupcall.cli", "worker")``)."""
        return self._start(["-m", name], args, env)

    def _start(
        self, target: list[str], args: tuple[object, ...], env: Mapping[str, str] | None
    ) -> Proc:
        argv = [sys.executable, *target, *(str(arg) for arg in args)]
        full_env = dict(os.environ)
        full_env.update(env or {})
        path = [str(REPO_ROOT), full_env.get("PYTHONPATH", "")]
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        full_env["PYTHONUNBUFFERED"] = "1"  # lines reach wait_line() as printed
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=full_env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        proc = Proc(argv, popen)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Kill every child still running (with its process group) and print its stderr."""
        for proc in self.procs:
            proc._kill_group()
            for reader in proc._readers:
                reader.join(5)
            if proc.stderr:
                print(f"--- stderr of {proc._name()} ---\n{proc.stderr}", file=sys.stderr)
        self.procs.clear()
