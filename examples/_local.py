"""What the examples share: a local upstream that counts its hits, a Redis to use, a fresh
namespace that is removed afterwards (all three from ``dedupcall.demo``), and the closing
OK line. Not an example itself."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dedupcall.demo.local import NoRedis, namespace, redis_url
from dedupcall.demo.upstream import Upstream

__all__ = ["Upstream", "in_threads", "parser", "setup", "verdict"]


def parser(doc: str, *, calls: int, keys: int, delay: float = 0.2) -> argparse.ArgumentParser:
    """The options every example takes: ``--calls --keys --delay --url``."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=calls, help="concurrent calls per part")
    parser.add_argument("--keys", type=int, default=keys, help="distinct keys they spread over")
    parser.add_argument("--delay", type=float, default=delay, help="upstream latency, seconds")
    parser.add_argument(
        "--url",
        help="Redis URL (default: REDIS_URL/REDIS_HOST, a local server, else embedded)",
    )
    return parser


@contextlib.contextmanager
def setup(opts: argparse.Namespace, prefix: str) -> Iterator[tuple[Upstream, str, str]]:
    """What one example run needs: the upstream, a Redis URL and a throwaway namespace."""
    try:
        with (
            Upstream(opts.delay) as upstream,
            redis_url(opts.url) as url,
            namespace(url, prefix) as name,
        ):
            yield upstream, url, name
    except NoRedis as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


async def in_threads(func: Callable[[Any], Any], args: list[Any]) -> list[Any]:
    """``func(arg)`` for every arg, each in a thread of its own, all at once."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=len(args)) as pool:
        return await asyncio.gather(*(loop.run_in_executor(pool, func, arg) for arg in args))


def verdict(hits: int, keys: int, calls: int, extra: str = "", ok: bool = True) -> int:
    """Print the closing line; 0 if the upstream ran exactly once per key (and ``ok``),
    else 1."""
    ok = ok and hits == keys
    word = "OK" if ok else "UNEXPECTED"
    print(f"{word}: {hits} upstream calls for {keys} keys ({calls} calls made){extra}")
    return 0 if ok else 1
