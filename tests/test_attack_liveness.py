"""Attack: a lease shorter than the heartbeat interval (update_config(lock_timeout=0.5)
with the default heartbeat_interval=1.0, all within bounds). An executor that crashes
must still lose its flight within about a lease plus a sweep, and its waiter be served."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from dedupcall import Dedup
from procs import Spawner
from upstream import Upstream


@pytest.mark.parametrize("lease", [0.5, 0.9])
async def test_a_crashed_executor_is_recovered_when_the_lease_is_shorter_than_a_heartbeat(
    lease: float,
    spawn: Spawner,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    config = {"lock_timeout": lease, "heartbeat_interval": 1.0}
    here = make_dedup(**config)
    await here.start()
    spec = {
        "url": redis_url,
        "namespace": namespace,
        "upstream": upstream.url,
        "config": config,
        "keys": ["/crash"],
        "crash": True,  # whoever runs the call dies
    }
    child = spawn("caller.py", json.dumps(spec))
    for _ in range(1000):
        item = await here.get_flight_by_key("/crash")
        if item is not None and item.state == "running":
            break
        await asyncio.sleep(0.01)
    child.wait(10)  # dead, holding the flight's lease

    async def value() -> str:
        return "recovered"

    # lease + one sweep is about 1.5 s; 6 s is generous
    assert await here.call("/crash", value, timeout=6) == "recovered"
