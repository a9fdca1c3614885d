"""Run dedupcall's fault campaigns: ``python tests/faults/run.py SCENARIO|all [options]``.

Each scenario prints one table row (``--json``: one JSON object per line): runs, faults
injected, calls answered, executions beyond one per key (and how many its faults allow),
lost results, hung waiters, typed errors, p99 wait, verdict. Exit code 0 when every
scenario passed, 1 when one did not, 2 for bad usage, 130 on Ctrl-C. See README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent.parent)]

from harness import Campaign, Figures  # noqa: E402
from scenarios import SCENARIOS, Scenario, Unavailable  # noqa: E402

COLUMNS = (
    ("scenario", 18, "scenario"),
    ("runs", 5, "runs"),
    ("faults", 7, "faults"),
    ("calls", 7, "calls"),
    ("extra", 6, "extra_executions"),
    ("allowed", 8, "allowed_extra"),
    ("lost", 5, "lost"),
    ("hung", 5, "hung"),
    ("typed", 6, "typed_errors"),
    ("spur", 5, "spurious_errors"),
    ("split", 6, "split_flights"),
    ("p99 wait", 9, "p99_wait_s"),
    ("time", 7, "seconds"),
    ("verdict", 8, "verdict"),
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tests/faults/run.py", description="dedupcall fault campaigns"
    )
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--runs", type=int, help="runs per scenario (default: its own)")
    parser.add_argument("--quick", action="store_true", help="one run each, load for 8 s")
    parser.add_argument("--seconds", type=float, help="how long load runs (default 60)")
    parser.add_argument("--json", action="store_true", help="one JSON object per scenario")
    parser.add_argument("--seed", type=int, help="seed the random choices")
    parser.add_argument("--keep", action="store_true", help="keep each work folder")
    opts = parser.parse_args(argv)
    if opts.runs is not None and opts.runs < 1:
        parser.error("--runs must be at least 1")
    if opts.seconds is None:
        opts.seconds = 8.0 if opts.quick else 60.0
    if opts.seed is None:
        opts.seed = random.randrange(1 << 32)
    return opts


async def campaign(sc: Scenario, opts: argparse.Namespace) -> dict[str, Any]:
    """Run one scenario ``--runs`` times against one server; return its summary."""
    runs = opts.runs or (1 if opts.quick else sc.runs)
    rng = random.Random(f"{opts.seed}:{sc.name}")
    total, start = Figures(), time.monotonic()
    try:
        async with Campaign(sc.campaign, keep=opts.keep) as camp:
            for _ in range(runs):
                total.add(await sc.fn(camp, rng, opts))
    except Unavailable as exc:
        return {"scenario": sc.name, "verdict": "skipped", "why": str(exc)}
    except Exception as exc:  # the harness broke (or Redis would not restart): say so, go on
        why = f"{type(exc).__name__}: {exc}"
        return {"scenario": sc.name, "verdict": "ERROR", "why": why, "seed": opts.seed}
    summary = total.summary(sc.name, time.monotonic() - start)
    summary["seed"] = opts.seed
    if opts.keep:
        summary["workdir"] = str(camp.workdir)
    return summary


def row(summary: dict[str, Any]) -> str:
    if summary["verdict"] in ("skipped", "ERROR"):
        return f"{summary['scenario']:<18} {summary['verdict']}: {summary['why']}"
    cells = []
    for _, width, name in COLUMNS:
        value = summary[name]
        text = "-" if value is None else f"{value:.3f}" if name == "p99_wait_s" else str(value)
        cells.append(text.ljust(width) if name == "scenario" else text.rjust(width))
    return " ".join(cells)


async def main(opts: argparse.Namespace) -> int:
    names = list(SCENARIOS) if opts.scenario == "all" else [opts.scenario]
    if not opts.json:
        print(" ".join(t.ljust(w) if i == 0 else t.rjust(w) for i, (t, w, _) in enumerate(COLUMNS)))
    failed = []
    for name in names:
        summary = await campaign(SCENARIOS[name], opts)
        print(json.dumps(summary) if opts.json else row(summary), flush=True)
        if summary["verdict"] in ("FAIL", "ERROR"):
            failed.append(summary)
    if not opts.json:
        print(f"seed {opts.seed}")
        for summary in (s for s in failed if s["verdict"] == "FAIL"):
            head = f"{summary['scenario']} (seed {summary['seed']})"
            print(f"\n{head}: typed errors {summary['errors']}")
            for violation in summary["violations"]:
                print(f"  - {violation}")
    return 1 if failed else 0


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    try:
        sys.exit(asyncio.run(main(options)))
    except KeyboardInterrupt:
        print("interrupted: every process and server started was stopped", file=sys.stderr)
        sys.exit(130)
