"""Every example in examples/ runs (small sizes) and tells the truth."""

from __future__ import annotations

import re
import subprocess
import sys

from procs import REPO_ROOT


def test_demo_runs_and_executes_each_key_once(redis_url: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "examples/demo.py",
            "--instances",
            "3",
            "--calls",
            "40",
            "--keys",
            "4",
            "--delay",
            "0.05",
            "--url",
            redis_url,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    table = out.stdout
    calls = re.search(r"calls made\s+(\d+)\s+(\d+)", table)
    execs = re.search(r"upstream executions\s+(\d+)\s+(\d+)", table)
    assert calls and execs, table
    assert calls.groups() == ("120", "120")
    assert execs.groups() == ("4", "120")  # with dedup: one per key; without: every call
    assert "OK: 4 upstream executions for 4 distinct keys" in table
