"""Running the project's commands and examples as real processes, and what tests check
after them (no key left behind)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import redis

from dedupcall.keys import KeySpace
from procs import REPO_ROOT


def run_python(
    *args: str, env: dict[str, str] | None = None, stdin: str = "", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python args...`` from the repository root; output captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=stdin,
        env=env,
    )


def no_redis_env(**extra: str) -> dict[str, str]:
    """The environment of a machine with no Redis configured or running locally."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    return {**env, "DEDUPCALL_LOCAL_REDIS": "none", **extra}


def cmdline(pid: int) -> str:
    """The command line of a running process ("" when there is none with that pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def assert_namespace_removed(url: str, stdout: str) -> None:
    """The run said it deleted its namespace, and no key of it is left."""
    cleanup = re.search(r"cleanup: deleted the \d+ Redis keys of namespace (\S+)", stdout)
    assert cleanup, stdout
    client = redis.Redis.from_url(url)
    try:
        assert client.keys(KeySpace(cleanup.group(1)).prefix + "*") == []
    finally:
        client.close()
