"""The status page: its HTTP endpoints, and the page itself in a real headless Chromium
(Debian's /usr/bin/chromium, driven by Playwright; no browser is downloaded)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

import dedupcall
from dedup_fixtures import hold_slot
from dedupcall import Dedup, Observer
from dedupcall.asgi import status_app
from dedupcall.embedded import free_port
from procs import REPO_ROOT, Proc, Spawner

ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = os.environ.get("DEDUPCALL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "s3cret-token"


def test_page_json_metrics_and_guarded_controls(make_sync_dedup: Callable[..., Dedup]) -> None:
    dedup = make_sync_dedup()
    app = Starlette(
        routes=[
            Mount("/ro", status_app(dedup)),
            Mount("/rw", status_app(dedup, control_token=TOKEN, refresh=0.5)),
        ],
        lifespan=dedupcall.lifespan(dedup),
    )
    with TestClient(app) as client:
        page = client.get("/ro/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'const BASE = "/ro/";' in page.text and "const REFRESH_MS = 2000;" in page.text
        assert "const REFRESH_MS = 500;" in client.get("/rw/").text
        body = client.get("/ro/json").json()
        assert body["controls"] is False and body["items"] == []
        assert body["namespace"] == dedup.namespace and "executed" in body["totals"]
        assert client.get("/rw/json").json()["controls"] is True

        metrics = client.get("/ro/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith(
            "text/plain"
        )
        assert "dedupcall_queue_length 0.0" in metrics.text
        assert (
            f'dedupcall_calls_total{{instance="{dedup.instance_id}",outcome="executed"}}'
            in metrics.text
        )
        assert "dedupcall_wait_seconds_bucket" in metrics.text

        assert client.post("/ro/clear").status_code == 403  # read-only
        assert client.post("/ro/config", json={"max_retries": 1}).status_code == 403
        assert client.post("/rw/clear").status_code == 401  # no token
        wrong = {"Authorization": "Bearer not-the-token"}
        assert client.post("/rw/clear", headers=wrong).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.post("/rw/clear", headers=auth).json()["removed"] == 0
        bad = client.post("/rw/config", headers=auth, json={"max_retries": "many"})
        assert bad.status_code == 400 and bad.json()["error"] == "ConfigError"
        assert (
            client.post("/rw/config", headers=auth, json={"socket_timeout": 1}).status_code == 400
        )
        assert client.post("/rw/config", headers=auth, content=b"[").status_code == 400
        ok = client.post("/rw/config", headers=auth, json={"max_retries": "6"})
        assert ok.status_code == 200 and ok.json()["config"] == {"max_retries": 6}
        assert client.get("/ro/json").json()["config"]["max_retries"] == 6


def test_status_app_rejects_bad_options() -> None:
    with pytest.raises(dedupcall.ConfigError, match="at least 8 characters"):
        status_app(control_token="short")
    with pytest.raises(dedupcall.ConfigError, match="items_limit"):
        status_app(items_limit=0)


async def serve_status(
    spawn: Spawner, redis_url: str, namespace: str, *extra: str
) -> tuple[str, Proc]:
    """``dedupcall status --serve`` as a real process; returns its base URL and process."""
    port = free_port()
    proc = spawn.module(
        "dedupcall", "status", "--serve", str(port), "--url", redis_url, "-n", namespace, *extra
    )
    await asyncio.to_thread(proc.wait_line, "status page of namespace", 30)
    return f"http://127.0.0.1:{port}/", proc


async def test_served_status_page_is_read_only_without_a_token(
    spawn: Spawner, redis_url: str, namespace: str
) -> None:
    base, proc = await serve_status(spawn, redis_url, namespace)
    async with httpx.AsyncClient() as client:
        assert (await client.get(base + "json")).json()["controls"] is False
        assert (await client.post(base + "clear")).status_code == 403
        assert (await client.get(base)).text.startswith("<!doctype html>")
    async with Observer(redis_url, namespace) as observer:
        # The server is no instance of the namespace it shows.
        assert (await observer.get_queue_status()).instances == []
    proc.kill(signal.SIGINT)  # Ctrl-C: a clean stop
    code, _, stderr = await asyncio.to_thread(proc.wait, 30)
    assert code == 0, stderr
    assert "Traceback" not in stderr


async def test_serve_on_a_taken_port_or_without_redis_fails_cleanly(
    spawn: Spawner, redis_url: str, namespace: str
) -> None:
    base, _ = await serve_status(spawn, redis_url, namespace)
    port = base.rsplit(":", 1)[1].strip("/")
    taken = spawn.module("dedupcall", "status", "--serve", port, "--url", redis_url)
    code, _, stderr = await asyncio.to_thread(taken.wait, 30)
    assert code == 1 and "could not serve on 127.0.0.1:" in stderr, stderr
    down = spawn.module(
        "dedupcall", "status", "--serve", "0", "--url", f"redis://127.0.0.1:{free_port()}/0"
    )
    code, _, stderr = await asyncio.to_thread(down.wait, 30)
    assert code == 3 and "cannot reach" in stderr and "Traceback" not in stderr


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
)
async def test_page_in_a_real_browser_shows_a_queued_flight_and_a_live_instance(
    spawn: Spawner, make_dedup: Callable[..., Dedup], redis_url: str, namespace: str
) -> None:
    from playwright.async_api import async_playwright, expect

    dedup = make_dedup()
    await dedup.start()
    await dedup.update_config(max_concurrent=1)
    blocker = await hold_slot(dedup)
    waiting = asyncio.create_task(
        dedup.call("/reports/<b>quarterly</b>", lambda: asyncio.sleep(0, result=1))
    )
    base, _ = await serve_status(spawn, redis_url, namespace, "--token", TOKEN)

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on(
                "console",
                lambda msg: errors.append(msg.text) if msg.type == "error" else None,
            )
            await page.goto(base)
            flights = page.locator("#flights")
            # The key is shown as text, never as markup (no <b> element appears).
            await flights.get_by_text("/reports/<b>quarterly</b>").wait_for(timeout=10_000)
            assert await flights.locator("b").count() == 0
            assert await flights.locator(".state.queued").count() == 1
            assert await flights.locator(".state.running").count() == 1
            instances = page.locator("#instances")
            await instances.get_by_text(dedup.instance_id, exact=False).wait_for(timeout=10_000)
            assert await page.locator("#dot.ok").count() == 1
            queued = page.locator('.card[data-metric="queued"] .n')
            assert await queued.inner_text() == "1"
            assert await page.locator("#controls").is_visible()  # a token was given
            await page.screenshot(path=str(ARTIFACTS / "status_page.png"), full_page=True)

            # It refreshes itself: a flight queued after the page loaded shows up.
            later = asyncio.create_task(dedup.call("/later", lambda: asyncio.sleep(0, result=2)))
            await flights.get_by_text("/later").wait_for(timeout=10_000)
            assert await queued.inner_text() == "2"

            # Clear from the page: the confirm dialog is accepted, the queued call fails.
            page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await page.fill("#token", TOKEN)
            await page.click("#clear")
            await page.locator("#message").get_by_text("removed 2 flight(s)").wait_for()
            for cleared in (waiting, later):
                with pytest.raises(dedupcall.QueueCleared):
                    await cleared
            await expect(page.locator(".state.queued")).to_have_count(0, timeout=10_000)
            assert errors == []
        finally:
            await browser.close()
    await blocker.release()
