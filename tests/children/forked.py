"""Child process: a Dedup used by sync callers, then a fork. The forked grandchild must
get a clear error from a sync call (not hang on the parent's loop thread) and exit
normally (its exit hook must not hang either). Prints a JSON line with what happened.

Usage: python forked.py <redis url> <namespace>
"""

from __future__ import annotations

import json
import os
import sys
import time

from dedupcall import Dedup, DedupError, queued_api

dedup = Dedup(sys.argv[1], namespace=sys.argv[2], lock_timeout=1.0, heartbeat_interval=0.2)


@queued_api(path="/forked/{n}", dedup=dedup, timeout=2.0)
def double(n: int) -> int:
    return 2 * n


def main() -> None:
    before = double(1)  # starts the private loop thread
    pid = os.fork()
    if pid == 0:
        started = time.monotonic()
        try:
            double(2)
            error = None
        except DedupError as exc:
            error = str(exc)
        with open(os.environ["FORKED_REPORT"], "w") as report:
            json.dump({"error": error, "seconds": time.monotonic() - started}, report)
        sys.exit(0)  # a normal exit: atexit hooks run
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, 9)
        status = -1
    with open(os.environ["FORKED_REPORT"]) as report:
        child = json.load(report)
    print(json.dumps({"before": before, "child": child, "child_status": status}))
    dedup.close()


if __name__ == "__main__":
    main()
