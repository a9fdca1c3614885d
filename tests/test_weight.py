"""A service that imports dedupcall pays for the core only: no CLI, no page, no server
libraries, and the ``dedupcall`` command says what to install when its extra is missing.
Each check runs in a fresh interpreter, as a user's service would start."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

from procs import REPO_ROOT
from runs import run_python

# Modules a user's service must not load by importing dedupcall (the cli extra's, and
# those only the status page or the lifespan's server needs).
HEAVY = ("click", "rich", "pygments", "uvicorn", "starlette", "prometheus_client")

# Like a venv without the cli extra: these imports fail (httpx then skips its own CLI).
WITHOUT_CLI = (
    "import sys\nfor name in ('click', 'rich', 'uvicorn'):\n    sys.modules[name] = None\n"
)


def test_importing_dedupcall_loads_no_cli_page_or_server_library() -> None:
    code = WITHOUT_CLI + (
        "import dedupcall, dedupcall.asgi, json\n"
        "loaded = {m.split('.')[0] for m, v in sys.modules.items() if v}\n"
        f"print(json.dumps(sorted(loaded & set({HEAVY!r}))))"
    )
    out = run_python("-c", code)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_the_examples_helpers_load_without_the_cli_extra() -> None:
    # The examples find Redis and run their upstream with the demo's modules.
    code = WITHOUT_CLI + "sys.path.insert(0, 'examples')\nimport _local\nprint('ok')"
    out = run_python("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_lifespan_and_the_page_work_without_the_cli_extra() -> None:
    code = WITHOUT_CLI + (
        "import dedupcall\n"
        "from dedupcall.asgi import status_app\n"
        "from starlette.testclient import TestClient\n"
        "obs = dedupcall.Observer('redis://127.0.0.1:1/0', 'weight')\n"
        "with TestClient(status_app(obs)) as client:\n"
        "    print(client.get('/').status_code, client.get('/json').status_code)\n"
        "assert callable(dedupcall.lifespan())\n"
    )
    out = run_python("-W", "ignore", "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["200", "503"]  # the page, and Redis unreachable


def test_the_command_says_what_to_install_without_the_cli_extra() -> None:
    run = WITHOUT_CLI + "from dedupcall.command import main\nsys.argv[0] = 'dedupcall'\nmain()"
    out = run_python("-c", run, "status")
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.strip() == (
        "error: the dedupcall command needs click and rich, from the cli extra, "
        'which is not installed: pip install "dedupcall[cli]"'
    )
    out = run_python("-c", run, "status", "--json")
    assert out.returncode == 1
    assert json.loads(out.stdout) == {
        "error": "NotInstalled",
        "message": "the dedupcall command needs click and rich, from the cli extra, "
        'which is not installed: pip install "dedupcall[cli]"',
    }


def test_serving_the_page_without_uvicorn_says_what_to_install() -> None:
    # Said before Redis is asked anything: the advice must not hide behind an outage.
    run = "import sys\nsys.modules['uvicorn'] = None\n" + (
        "from dedupcall.command import main\nsys.argv[0] = 'dedupcall'\nmain()"
    )
    args = ("status", "--serve", "0", "--url", "redis://127.0.0.1:1/0")
    out = run_python("-c", run, *args)
    assert out.returncode == 1
    assert 'status --serve needs uvicorn: pip install "dedupcall[cli]"' in out.stderr
    out = run_python("-c", run, *args, "--json")
    assert out.returncode == 1
    assert json.loads(out.stdout)["error"] == "NotInstalled"


def test_usage_errors_are_json_under_json() -> None:
    for args in (["status", "--json", "--no-such-option"], ["no-such-command", "--json"]):
        out = run_python("-m", "dedupcall", *args)
        assert out.returncode == 2, out.stderr
        body = json.loads(out.stdout)
        assert body["error"] == "UsageError" and "No such" in body["message"]
        assert out.stderr == ""
    out = run_python("-m", "dedupcall", "status", "--no-such-option")
    assert out.returncode == 2 and out.stdout == ""
    assert "Usage: dedupcall status" in out.stderr and "No such option" in out.stderr


def _on_a_terminal(*args: str, env: dict[str, str]) -> tuple[int, bytes]:
    """Run ``python -m dedupcall args`` with stdout and stderr on a pseudo-terminal (where
    colours would be drawn); return its exit code and everything it wrote."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dedupcall", *args],
        cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env,
    )  # fmt: skip
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    return proc.wait(30), output


def test_no_color_holds_for_errors_and_tables() -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DEDUPCALL_"))}
    base.pop("NO_COLOR", None)
    base["TERM"] = "xterm-256color"
    unreachable = ["status", "--url", "redis://127.0.0.1:1/0"]
    code, coloured = _on_a_terminal(*unreachable, env=base)
    assert code == 3 and b"\x1b[" in coloured  # a terminal gets colour by default...
    code, plain = _on_a_terminal(*unreachable, env={**base, "NO_COLOR": "1"})
    assert code == 3 and b"cannot reach" in plain
    assert b"\x1b[" not in plain  # ...and none at all under NO_COLOR
    code, helped = _on_a_terminal("--help", env={**base, "NO_COLOR": "1"})
    assert code == 0 and b"Usage" in helped and b"\x1b[" not in helped
