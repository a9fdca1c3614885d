"""The test upstream counts what really reached it, and behaves as the request asks."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from procs import Spawner
from upstream import Upstream


def test_counts_hits_and_peak_of_concurrent_requests(upstream: Upstream) -> None:
    n = 8
    barrier = threading.Barrier(n)
    bodies: list[dict[str, object]] = []

    def call() -> None:
        barrier.wait()
        response = client.get(f"{upstream.url}/value/a?delay=0.5")
        bodies.append(response.json())

    with httpx.Client(timeout=10) as client:
        threads = [threading.Thread(target=call) for _ in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        client.get(f"{upstream.url}/value/b")

    assert upstream.hits("/value/a") == n
    assert upstream.hits() == n + 1
    assert upstream.peak("/value/a") == n
    assert upstream.peak("/value/b") == 1
    assert upstream.peak() == n
    assert sorted(body["hit"] for body in bodies) == list(range(1, n + 1))  # type: ignore[type-var]
    assert len({body["exec_id"] for body in bodies}) == n
    assert upstream.order == ["/value/a"] * n + ["/value/b"]


def test_status_and_retry_after_from_the_query(upstream: Upstream) -> None:
    response = httpx.get(f"{upstream.url}/value/x?status=503&retry_after=2")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    assert response.json()["path"] == "/value/x"


def test_scripted_statuses_are_consumed_in_turn(upstream: Upstream) -> None:
    upstream.script("/flaky/1", [503, 429, 200], retry_after=[1, "0.5", None])
    with httpx.Client(base_url=upstream.url) as client:
        answers = [client.get("/flaky/1") for _ in range(4)]
    assert [r.status_code for r in answers] == [503, 429, 200, 200]
    assert [r.headers.get("Retry-After") for r in answers] == ["1", "0.5", None, None]
    assert [r.json()["hit"] for r in answers] == [1, 2, 3, 4]


def test_bytes_are_the_same_every_time(upstream: Upstream) -> None:
    first = httpx.get(f"{upstream.url}/bytes/5000")
    second = httpx.get(f"{upstream.url}/bytes/5000")
    assert first.headers["Content-Type"] == "application/octet-stream"
    assert len(first.content) == 5000
    assert first.content == second.content
    assert httpx.get(f"{upstream.url}/bytes/4999").content != first.content[:4999]


def test_echo_returns_method_headers_and_body(upstream: Upstream) -> None:
    with httpx.Client(base_url=upstream.url) as client:
        for method in ("POST", "PUT", "DELETE"):
            response = client.request(
                method, "/echo?a=1", content=b'{"x": 1}', headers={"X-Test": method}
            )
            echoed = response.json()
            assert echoed["method"] == method
            assert echoed["query"] == {"a": "1"}
            assert echoed["headers"]["X-Test"] == method
            assert echoed["body"] == '{"x": 1}'
        streamed = client.post("/echo", content=iter([b"chunk-1 ", b"chunk-2"]))
        assert streamed.json()["body"] == "chunk-1 chunk-2"
        head = client.head("/value/h")
    assert head.status_code == 200 and head.content == b""
    assert upstream.hits("/echo") == 4 and upstream.hits("/value/h") == 1


def test_reset_forgets_counts_and_scripts(upstream: Upstream) -> None:
    upstream.script("/value/r", [500])
    assert httpx.get(f"{upstream.url}/value/r").status_code == 500
    upstream.reset()
    assert upstream.hits() == 0 and upstream.peak() == 0 and upstream.order == []
    assert httpx.get(f"{upstream.url}/value/r").json()["hit"] == 1


def test_child_processes_reach_it_and_read_stats(
    upstream: Upstream, spawn: Spawner, tmp_path: Path
) -> None:
    script = tmp_path / "caller.py"
    script.write_text(
        "import json, sys, httpx\n"
        "url = sys.argv[1]\n"
        "httpx.get(url + '/value/child')\n"
        "print('ready', flush=True)\n"
        "print(json.dumps(httpx.get(url + '/_stats').json()))\n"
    )
    children = [spawn(script, upstream.url) for _ in range(2)]
    children[0].wait_line("ready")
    stats = [child.json() for child in children]
    assert upstream.hits("/value/child") == 2
    assert upstream.hits("/_stats") == 0  # the stats endpoint doesn't count itself
    assert max(s["hits"]["/value/child"] for s in stats) == 2
