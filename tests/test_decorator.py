"""@queued_api in one process: async and sync functions, methods, classmethods and
staticmethods; path templates; values, codecs and failures; the default Dedup; failing
open or closed when Redis is unreachable."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dedupcall
from dedup_fixtures import hold_slot
from dedupcall import (
    CallFailed,
    ConfigError,
    Dedup,
    DedupError,
    PathTemplateError,
    RedisUnavailable,
    SerializationError,
    WaitTimeout,
    queued_api,
)
from dedupcall.embedded import free_port
from dedupcall.entry import reset_default


@pytest.fixture
def no_default() -> Iterator[None]:
    reset_default()
    yield
    reset_default()


async def test_async_function_runs_once_and_keeps_its_face(dedup: Dedup) -> None:
    runs = 0

    @queued_api(path="/api/users/{user_id}", dedup=dedup, ttl=60)
    async def get_user(user_id: int, *, verbose: bool = False) -> dict[str, Any]:
        """Fetch one user."""
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.05)
        return {"id": user_id, "verbose": verbose}

    assert inspect.iscoroutinefunction(get_user)
    assert get_user.__name__ == "get_user"
    assert get_user.__doc__ == "Fetch one user."
    assert list(inspect.signature(get_user).parameters) == ["user_id", "verbose"]
    assert inspect.signature(get_user) == inspect.signature(get_user.__wrapped__)
    values = await asyncio.gather(*[get_user(7) for _ in range(50)])
    assert values == [{"id": 7, "verbose": False}] * 50
    assert runs == 1
    assert await get_user(user_id=7, verbose=True) == {"id": 7, "verbose": False}  # cached
    assert (dedup.stats()["executed"], dedup.stats()["joined"], dedup.stats()["cached"]) == (
        1,
        49,
        1,
    )


async def test_defaults_and_keyword_arguments_fill_the_template(dedup: Dedup) -> None:
    keys: list[tuple[Any, ...]] = []

    @queued_api(path="/items/{item_id}/{page}/{size}", dedup=dedup)
    async def items(item_id: int, page: int = 1, **options: Any) -> list[Any]:
        keys.append((item_id, page, options))
        return [item_id, page]

    assert await items(1, size=10) == [1, 1]
    assert await items(item_id=1, page=1, size=10) == [1, 1]  # the same key: cached
    assert await items(1, 2, size=10) == [1, 2]
    assert len(keys) == 2
    with pytest.raises(PathTemplateError, match="could not be filled"):
        await items(1)  # {size} comes only from **options


class Users:
    runs = 0

    def __init__(self, dedup: Dedup, tenant: str) -> None:
        self.dedup = dedup
        self.tenant = tenant


def make_users_class(dedup: Dedup) -> type[Users]:
    class Service(Users):
        @queued_api(path="/t/{self.tenant}/users/{user_id}", dedup=dedup)
        async def get(self, user_id: int) -> list[Any]:
            type(self).runs += 1
            await asyncio.sleep(0.02)
            return [self.tenant, user_id]

        @queued_api(path="/sync/{self.tenant}/{user_id}", dedup=dedup)
        def get_sync(self, user_id: int) -> list[Any]:
            type(self).runs += 1
            time.sleep(0.05)
            return [self.tenant, user_id]

        @queued_api(path="/classes/{cls.__name__}/{n}", dedup=dedup)
        @classmethod
        async def count(cls, n: int) -> str:
            cls.runs += 1
            return f"{cls.__name__}:{n}"

        @classmethod
        @queued_api(path="/classes-inner/{n}", dedup=dedup)
        def count_sync(cls, n: int) -> int:
            cls.runs += 1
            return n * 2

        @staticmethod
        @queued_api(path="/static/{n}", dedup=dedup)
        async def static(n: int) -> int:
            Service.runs += 1
            return n + 1

        @queued_api(path="/static-sync/{n}", dedup=dedup)
        @staticmethod
        def static_sync(n: int) -> int:
            Service.runs += 1
            return n + 2

    return Service


async def test_methods_classmethods_and_staticmethods(dedup: Dedup) -> None:
    service = make_users_class(dedup)
    a, b = service(dedup, "a"), service(dedup, "b")
    assert await asyncio.gather(a.get(1), a.get(1), b.get(1)) == [["a", 1], ["a", 1], ["b", 1]]
    assert service.runs == 2  # one per tenant: self.tenant is part of the key
    assert await asyncio.gather(service.count(3), a.count(3)) == ["Service:3", "Service:3"]
    assert await asyncio.gather(service.static(4), b.static(4)) == [5, 5]
    assert service.runs == 4
    assert inspect.iscoroutinefunction(service.count)
    assert inspect.iscoroutinefunction(a.static)
    assert not inspect.iscoroutinefunction(a.get_sync)

    # Sync ones, called from threads while the Dedup runs on this loop (as in a web app).
    def from_threads(fn: Callable[[], Any], n: int = 8) -> list[Any]:
        with_threads: list[Any] = [None] * n

        def run(i: int) -> None:
            with_threads[i] = fn()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return with_threads

    assert await asyncio.to_thread(from_threads, lambda: a.get_sync(9)) == [["a", 9]] * 8
    assert await asyncio.to_thread(from_threads, lambda: service.count_sync(5)) == [10] * 8
    assert await asyncio.to_thread(from_threads, lambda: b.static_sync(5)) == [7] * 8
    assert service.runs == 7


def test_sync_threads_share_one_flight_run_in_a_caller_thread(
    make_sync_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_sync_dedup()
    ran_in: list[str] = []

    @queued_api(path="/reports/{report_id}", dedup=dedup)
    def build_report(report_id: str) -> dict[str, str]:
        ran_in.append(threading.current_thread().name)
        time.sleep(0.2)
        return {"report": report_id}

    assert not inspect.iscoroutinefunction(build_report)
    out: list[Any] = []
    callers = [
        threading.Thread(target=lambda: out.append(build_report("r1")), name=f"caller-{i}")
        for i in range(16)
    ]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert out == [{"report": "r1"}] * 16
    assert len(ran_in) == 1 and ran_in[0].startswith("caller-")  # in a calling thread
    assert build_report("r1") == {"report": "r1"}  # cached, from the main thread
    stats = dedup.stats()
    assert (stats["executed"], stats["joined"], stats["cached"]) == (1, 15, 1)
    assert any(t.name.startswith("dedupcall-loop") for t in threading.enumerate())
    dedup.close()
    assert not any(t.name.startswith("dedupcall-loop") for t in threading.enumerate())


def test_sync_caller_that_times_out_hands_the_flight_to_another_thread(
    make_sync_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_sync_dedup(max_concurrent=1)
    gate = threading.Event()
    ran_in: list[str] = []

    @queued_api(path="/slot", dedup=dedup)
    def hold() -> int:
        gate.wait(10)
        return 0

    @queued_api(path="/patient", dedup=dedup)
    def patient() -> int:
        ran_in.append(threading.current_thread().name)
        return 42

    @queued_api(path="/patient", dedup=dedup, timeout=0.3)
    def impatient() -> int:
        raise AssertionError("the flight's opener left before it was granted")

    holder = threading.Thread(target=hold)
    holder.start()
    _wait_state(dedup, "/slot", "running")
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            impatient()
        except WaitTimeout as exc:
            errors.append(exc)

    first = threading.Thread(target=opener, name="opener")
    first.start()
    _wait_state(dedup, "/patient", "queued")  # the opener's flight waits behind the slot
    result: list[int] = []
    second = threading.Thread(target=lambda: result.append(patient()), name="patient")
    second.start()
    first.join()
    assert len(errors) == 1
    gate.set()
    second.join()
    holder.join()
    assert result == [42] and ran_in == ["patient"]


def _wait_state(dedup: Dedup, key: str, state: str) -> None:
    for _ in range(500):
        item = dedup.sync.run(dedup.get_flight_by_key(key))
        if item is not None and item.state == state:
            return
        time.sleep(0.01)
    raise AssertionError(f"{key} never became {state}")


async def test_sync_function_called_on_the_dedup_loop_is_refused(dedup: Dedup) -> None:
    @queued_api(path="/blocking", dedup=dedup)
    def blocking() -> int:
        return 1

    with pytest.raises(DedupError, match="would block that loop"):
        blocking()
    assert await asyncio.to_thread(blocking) == 1


def test_template_errors_are_raised_at_decoration() -> None:
    def fn(user_id: int) -> None: ...

    with pytest.raises(PathTemplateError, match="names 'user'"):
        queued_api(path="/u/{user}")(fn)
    with pytest.raises(PathTemplateError, match="positional field"):
        queued_api(path="/u/{}")(fn)
    with pytest.raises(PathTemplateError, match="positional field"):
        queued_api(path="/u/{0}")(fn)
    with pytest.raises(PathTemplateError, match="malformed"):
        queued_api(path="/u/{user_id")(fn)
    with pytest.raises(PathTemplateError, match="names 'width'"):
        queued_api(path="/u/{user_id:{width}}")(fn)
    with pytest.raises(PathTemplateError, match="accept its arguments by name"):
        queued_api(path=lambda other: "/x")(fn)
    with pytest.raises(PathTemplateError, match="str template or a callable"):
        queued_api(path=42)(fn)  # type: ignore[arg-type]
    assert isinstance(PathTemplateError("x"), TypeError)
    queued_api(path="/u/{user_id!r:>10}")(fn)  # conversions and specs are fine

    def gen(n: int) -> Iterator[int]:
        yield n

    with pytest.raises(ConfigError, match="generator"):
        queued_api(path="/g/{n}")(gen)
    with pytest.raises(ConfigError, match="on_redis_error"):
        queued_api(path="/u/{user_id}", on_redis_error="ignore")
    with pytest.raises(ConfigError, match="priority"):
        queued_api(path="/u/{user_id}", priority="high")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="retry_on"):
        queued_api(path="/u/{user_id}", retry_on=("ValueError",))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="codec"):
        queued_api(path="/u/{user_id}", codec=object())  # type: ignore[arg-type]


async def test_path_callable_takes_the_arguments_by_name(dedup: Dedup) -> None:
    seen: list[str] = []

    @queued_api(path=lambda report_id, **_: f"/reports/{report_id}", dedup=dedup)
    async def report(report_id: str, fmt: str = "pdf") -> str:
        seen.append(fmt)
        return f"{report_id}.{fmt}"

    assert await report("r", fmt="pdf") == "r.pdf"
    assert await report("r", "csv") == "r.pdf"  # same key, cached
    assert seen == ["pdf"]

    @queued_api(path=lambda n: n, dedup=dedup)
    async def bad(n: int) -> int:
        return n

    with pytest.raises(PathTemplateError, match="must return str"):
        await bad(1)


async def test_unserializable_value_names_function_and_key(dedup: Dedup) -> None:
    @queued_api(path="/objects/{n}", dedup=dedup)
    async def make_object(n: int) -> object:
        return object()

    with pytest.raises(CallFailed) as info:
        await make_object(3)
    assert info.value.error_type == "SerializationError"
    assert "make_object" in str(info.value) and "/objects/3" in str(info.value)
    assert isinstance(info.value.__cause__, SerializationError)


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class PointCodec:
    def encode(self, value: Point) -> dict[str, int]:
        return dataclasses.asdict(value)

    def decode(self, data: dict[str, int]) -> Point:
        return Point(**data)


async def test_codec_carries_values_json_cannot(dedup: Dedup) -> None:
    @queued_api(path="/points/{x}/{y}", dedup=dedup, codec=PointCodec())
    async def point(x: int, y: int) -> Point:
        return Point(x, y)

    assert await asyncio.gather(point(1, 2), point(1, 2)) == [Point(1, 2), Point(1, 2)]
    assert await point(1, 2) == Point(1, 2)  # from the cache, decoded

    @queued_api(path="/broken/{x}", dedup=dedup, codec=PointCodec())
    async def not_a_point(x: int) -> Any:
        return x

    with pytest.raises(CallFailed, match="codec could not encode"):
        await not_a_point(1)


async def test_failures_reach_every_caller_and_retry_on_retries(dedup: Dedup) -> None:
    attempts = 0

    @queued_api(path="/flaky", dedup=dedup, retry_on=ConnectionError)
    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.02)
        if attempts < 3:
            raise ConnectionError("reset")
        return "ok"

    assert await asyncio.gather(flaky(), flaky()) == ["ok", "ok"]
    assert attempts == 3

    runs = 0

    @queued_api(path="/broken", dedup=dedup, cache_failures=True)
    async def broken() -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.02)
        raise KeyError("gone")

    outcomes = await asyncio.gather(broken(), broken(), return_exceptions=True)
    assert all(isinstance(o, CallFailed) and o.error_type == "KeyError" for o in outcomes)
    # Every caller in the process that ran it shares the original exception.
    assert all(isinstance(o.__cause__, KeyError) for o in outcomes)
    with pytest.raises(CallFailed):
        await broken()  # the failure was cached
    assert runs == 1


async def test_last_waiter_cancelled_drops_a_queued_flight(dedup: Dedup) -> None:
    await dedup.update_config(max_concurrent=1)
    blocker = await hold_slot(dedup)
    runs = 0

    @queued_api(path="/never", dedup=dedup, timeout=0.2)
    async def never() -> None:
        nonlocal runs
        runs += 1

    with pytest.raises(WaitTimeout):
        await never()
    for _ in range(100):
        if await dedup.get_flight_by_key("/never") is None:
            break
        await asyncio.sleep(0.01)
    assert await dedup.get_flight_by_key("/never") is None
    await blocker.release()
    assert runs == 0


async def test_default_dedup_from_configure(dedup: Dedup, no_default: None) -> None:
    @queued_api(path="/default/{n}")
    async def doubled(n: int) -> int:
        return n * 2

    with pytest.raises(ConfigError, match="configure"):
        await doubled(1)
    assert dedupcall.configure(dedup) is dedup
    assert await doubled(2) == 4
    assert dedup.stats()["executed"] == 1
    with pytest.raises(ConfigError):
        dedupcall.configure(dedup, url="redis://x")


def test_default_dedup_from_the_environment(
    redis_url: str, namespace: str, no_default: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("DEDUPCALL_NAMESPACE", namespace)

    @queued_api(path="/env/{n}")
    def tripled(n: int) -> int:
        return n * 3

    assert tripled(3) == 9
    default = dedupcall.entry.default_dedup()
    assert default.namespace == namespace
    assert default.stats()["executed"] == 1
    default.close()


async def test_redis_down_raises_or_bypasses() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    down = Dedup(dead, namespace="down", socket_timeout=0.5)
    runs = 0

    @queued_api(path="/a", dedup=down)
    async def closed() -> int:
        return 1

    @queued_api(path="/b", dedup=down, on_redis_error="bypass")
    async def open_() -> int:
        nonlocal runs
        runs += 1
        return 2

    with pytest.raises(RedisUnavailable):
        await closed()
    assert [await open_() for _ in range(3)] == [2, 2, 2]
    assert runs == 3
    assert down.stats()["bypassed"] == 3
    await down.aclose()


def test_sync_bypass_when_redis_is_down() -> None:
    down = Dedup(f"redis://127.0.0.1:{free_port()}/0", namespace="down", socket_timeout=0.5)

    @queued_api(path="/s", dedup=down, on_redis_error="bypass")
    def direct() -> str:
        return threading.current_thread().name

    assert direct() == threading.current_thread().name
    assert down.stats()["bypassed"] == 1
    down.close()


async def test_cancelled_callers_leave_without_harming_the_others(dedup: Dedup) -> None:
    runs = 0
    started = asyncio.Event()

    @queued_api(path="/slow/{n}", dedup=dedup)
    async def slow(n: int) -> int:
        nonlocal runs
        runs += 1
        started.set()
        await asyncio.sleep(0.3)
        return n

    opener = asyncio.create_task(slow(1))  # its process runs the function
    await started.wait()
    others = [asyncio.create_task(slow(1)) for _ in range(3)]
    await asyncio.sleep(0.05)
    opener.cancel()
    others[0].cancel()
    assert await asyncio.gather(*others[1:]) == [1, 1]
    with pytest.raises(asyncio.CancelledError):
        await opener

    # Every caller gone while it runs: the flight still finishes, and its result is stored.
    started.clear()
    lone = asyncio.create_task(slow(2))
    await started.wait()
    lone.cancel()
    for _ in range(100):
        if await dedup.get_flight_by_key("/slow/2") is None:
            break
        await asyncio.sleep(0.02)
    assert await slow(2) == 2
    assert runs == 2  # /slow/2 ran once: the last call was a cache hit


def test_forked_child_gets_an_error_instead_of_a_hang(
    spawn: Any, redis_url: str, namespace: str, tmp_path: Any
) -> None:
    report = tmp_path / "forked.json"
    out = spawn("forked.py", redis_url, namespace, env={"FORKED_REPORT": str(report)}).json(30)
    assert out["before"] == 2
    assert "forked" in out["child"]["error"] and out["child"]["seconds"] < 1.0
    assert out["child_status"] == 0  # its exit did not hang in the close-at-exit hook


def test_a_sync_function_past_its_execution_timeout_is_not_overlapped_by_its_retry(
    make_sync_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_sync_dedup(execution_timeout=0.2, retry_delay=0.01)
    lock = threading.Lock()
    active = peak = runs = 0

    @queued_api(path="/overrun", dedup=dedup, retry_on=TimeoutError)
    def overrun() -> int:
        nonlocal active, peak, runs
        with lock:
            active, runs = active + 1, runs + 1
            peak = max(peak, active)
            first = runs == 1
        time.sleep(0.5 if first else 0.0)  # a thread cannot be stopped: it runs on
        with lock:
            active -= 1
        return runs

    assert overrun() == 2  # the first attempt timed out; the retry ran after it returned
    assert (runs, peak) == (2, 1)


def test_sync_timeout_bounds_waiters_but_not_the_thread_running_the_function(
    make_sync_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_sync_dedup()

    @queued_api(path="/long", dedup=dedup, timeout=0.2)
    def long() -> str:
        time.sleep(0.5)
        return "done"

    outcomes: list[Any] = []

    def joiner() -> None:
        started = time.monotonic()
        try:
            outcomes.append(long())
        except WaitTimeout:
            outcomes.append(("timeout", round(time.monotonic() - started, 1)))

    runner = threading.Thread(target=lambda: outcomes.append(long()))
    runner.start()
    _wait_state(dedup, "/long", "running")
    waiter = threading.Thread(target=joiner)
    waiter.start()
    runner.join()
    waiter.join()
    assert sorted(map(str, outcomes)) == ["('timeout', 0.2)", "done"]
    assert dedup.stats()["timeouts"] == 1


def test_a_sync_caller_leaving_by_exception_drops_its_queued_flight(
    make_sync_dedup: Callable[..., Dedup],
) -> None:
    import signal

    dedup = make_sync_dedup(max_concurrent=1)
    gate = threading.Event()
    runs = 0

    @queued_api(path="/held", dedup=dedup)
    def held() -> int:
        gate.wait(10)
        return 0

    @queued_api(path="/interrupted", dedup=dedup)
    def interrupted() -> int:
        nonlocal runs
        runs += 1
        return 1

    class Interrupt(Exception):
        pass

    def interrupt(*_: object) -> None:
        raise Interrupt

    holder = threading.Thread(target=held)
    holder.start()
    _wait_state(dedup, "/held", "running")
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupt):
            interrupted()  # queued behind /held, then interrupted (as by Ctrl-C)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    for _ in range(100):
        if dedup.sync.run(dedup.get_flight_by_key("/interrupted")) is None:
            break
        time.sleep(0.01)
    assert dedup.sync.run(dedup.get_flight_by_key("/interrupted")) is None  # dropped
    gate.set()
    holder.join()
    assert runs == 0


async def test_bytes_keys_are_kept_exact(dedup: Dedup) -> None:
    @queued_api(path=lambda raw: raw, dedup=dedup)
    async def echo(raw: bytes) -> str:
        return raw.hex()

    assert await echo(b"\xff") == "ff"
    assert await echo(b"\\xff") == b"\\xff".hex()  # not taken for b"\xff"


async def test_fast_and_slow_argument_binding_agree(dedup: Dedup) -> None:
    @queued_api(path="/bind/{a}/{b}/{c}", dedup=dedup)
    async def simple(a: int, b: int = 2, *, c: int = 3) -> list[int]:
        return [a, b, c]

    @queued_api(path="/bind/{a}/{b}/{c}", dedup=dedup)
    async def general(a: int, /, b: int = 2, *rest: int, c: int = 3) -> list[int]:
        return [a, b, c]

    assert await simple(1) == await general(1) == [1, 2, 3]
    assert await simple(1, c=4) == await general(1, c=4) == [1, 2, 4]
    for bad_args, bad_kwargs in [((1, 2, 3), {}), ((), {}), ((1,), {"a": 1}), ((1,), {"d": 1})]:
        with pytest.raises(TypeError):
            await simple(*bad_args, **bad_kwargs)
