"""The ``dedupcall`` command (also ``python -m dedupcall``).

Every command takes ``--url`` and ``--namespace`` (after the command name), else reads the
environment as ``Dedup.from_env()`` does (``REDIS_URL`` or ``REDIS_HOST``...,
``DEDUPCALL_NAMESPACE``, ``DEDUPCALL_<SETTING>``). Inspection and control go through an
``Observer``: looking at a system does not make the CLI one of its instances.

Exit codes: 0 done; 1 failed or refused (a declined ``clear``, a demo that saw more
upstream calls than keys); 2 bad usage, URL or setting; 3 Redis unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click
from redis import exceptions as redis_exceptions
from rich.console import Console

from dedupcall import console as show
from dedupcall import report
from dedupcall.command import INSTALL
from dedupcall.config import (
    SHARED_FIELDS,
    check_shared,
    check_url,
    config_from_env,
    parse_env_value,
    redact,
    url_from_env,
)
from dedupcall.errors import ConfigError, DedupError, RedisUnavailable
from dedupcall.observer import Observer

EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 1, 2, 3
DEFAULT_URL = "redis://127.0.0.1:6379/0"
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """Where a command points: a Redis URL, a namespace and config from the environment."""

    url: str
    namespace: str
    config: dict[str, Any]
    as_json: bool

    @classmethod
    def resolve(cls, url: str | None, namespace: str | None, as_json: bool) -> Target:
        env = os.environ
        url = url or url_from_env(env) or DEFAULT_URL
        check_url(url)
        return cls(
            url=url,
            namespace=namespace or env.get("DEDUPCALL_NAMESPACE") or "dedupcall",
            config=config_from_env(env),
            as_json=as_json,
        )

    def observer(self) -> Observer:
        return Observer(self.url, self.namespace, **self.config)


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        return False


def fail(code: int, message: str, *, as_json: bool, kind: str = "Error") -> NoReturn:
    """Say what went wrong (stderr, or a JSON object on stdout with ``--json``), exit."""
    if as_json:
        click.echo(json.dumps({"error": kind, "message": message}))
    else:
        text = f"error: {message}"
        # NO_COLOR (https://no-color.org): set and not empty, no escape code at all (secho
        # would still append a reset).
        click.echo(text if os.environ.get("NO_COLOR") else click.style(text, fg="red"), err=True)
    sys.exit(code)


@contextlib.contextmanager
def handled(url: str | None, as_json: bool) -> Iterator[None]:
    """Turn our errors into a one-line message and an exit code (no traceback)."""
    try:
        yield
    except RedisUnavailable as exc:
        where = redact(url) if url else "Redis"
        cause = exc.__cause__
        if isinstance(cause, redis_exceptions.AuthenticationError):
            fail(EXIT_USAGE, f"{where} refused the credentials: {cause}", as_json=as_json,
                 kind="AuthenticationError")  # fmt: skip
        if isinstance(cause, redis_exceptions.ResponseError):  # reached, but it said no
            fail(EXIT_FAILED, f"{where} refused a command: {cause}", as_json=as_json,
                 kind="RedisError")  # fmt: skip
        message = f"cannot reach {where}: {exc}"
        fail(EXIT_UNAVAILABLE, message, as_json=as_json, kind="RedisUnavailable")
    except ConfigError as exc:
        fail(EXIT_USAGE, str(exc), as_json=as_json, kind="ConfigError")
    except DedupError as exc:
        fail(EXIT_FAILED, str(exc), as_json=as_json, kind=type(exc).__name__)
    except click.Abort:  # a prompt got no answer (stdin closed) or Ctrl-C
        fail(EXIT_FAILED, "aborted", as_json=as_json, kind="Aborted")


def with_target(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--url``, ``--namespace`` and ``--json``; pass the command a ``Target``."""

    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.option(
        "--namespace",
        "-n",
        metavar="NAME",
        help="Namespace (default: DEDUPCALL_NAMESPACE, else 'dedupcall').",
    )
    @click.option(
        "--url",
        metavar="URL",
        help=f"Redis URL (default: REDIS_URL, REDIS_HOST..., else {DEFAULT_URL}).",
    )
    @functools.wraps(command)
    def wrapper(url: str | None, namespace: str | None, as_json: bool, **kwargs: Any) -> Any:
        with handled(url, as_json):
            target = Target.resolve(url, namespace, as_json)
        with handled(target.url, as_json):
            return command(target, **kwargs)

    return wrapper


def observe(target: Target, work: Callable[[Observer], Awaitable[T]]) -> T:
    """Run ``work`` with an ``Observer`` of ``target``, closing it after."""

    async def run() -> T:
        async with target.observer() as observer:
            return await work(observer)

    return asyncio.run(run())


def emit(target: Target, data: Any, *parts: Any) -> None:
    """JSON of ``data`` with ``--json``, else the rich ``parts``."""
    if target.as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        show.show(Console(highlight=False), *parts)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dedupcall")
def cli() -> None:
    """dedupcall: call an upstream API once per path across every instance.

    Exit codes: 0 ok, 1 failed or refused, 2 bad usage or setting, 3 Redis unreachable.
    """


# --- status ------------------------------------------------------------------------------
@cli.command()
@with_target
@click.option(
    "--serve", type=click.IntRange(0, 65535), metavar="PORT", help="Serve the status page."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address for --serve.")
@click.option(
    "--token",
    envvar="DEDUPCALL_STATUS_TOKEN",
    help="Enable clear and config changes on the page for this bearer token "
    "(default: DEDUPCALL_STATUS_TOKEN; none: read-only).",
)
def status(target: Target, serve: int | None, host: str, token: str | None) -> None:
    """Queue length, running and delayed flights, live instances with their heartbeat
    age and numbers, counters and shared config. --serve PORT serves the status page."""
    if serve is not None and not installed("uvicorn"):
        fail(EXIT_FAILED, f"status --serve needs uvicorn: {INSTALL}", as_json=target.as_json,
             kind="NotInstalled")  # fmt: skip
    view = observe(
        target,
        lambda o: o.get_queue_status(),
    )
    data = report.status_view(view, target.namespace)
    if serve is None:
        emit(target, data, show.status_group(data, redact(target.url)))
        return
    serve_page(target, host, serve, token)


def serve_page(target: Target, host: str, port: int, token: str | None) -> None:
    """Serve ``status_app`` with uvicorn until SIGINT/SIGTERM (a clean stop, exit 0)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from dedupcall.asgi import status_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # ours, below: uvicorn's re-raises the signal after a graceful stop

    observer = target.observer()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        try:
            yield
        finally:
            await observer.aclose()

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DedupError(f"could not serve on {host}:{port}: {exc.strerror or exc}") from None
    page = status_app(observer, control_token=token)
    app = Starlette(routes=[Mount("/", page)], lifespan=lifespan)
    # uvicorn colours its log lines on a terminal whatever NO_COLOR says.
    colors = False if os.environ.get("NO_COLOR") else None
    server = Server(uvicorn.Config(app, log_level="warning", lifespan="on", use_colors=colors))

    def stop() -> None:
        server.force_exit = server.should_exit  # a second signal: don't wait for requests
        server.should_exit = True

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        if not server.started:
            with contextlib.suppress(SystemExit):  # uvicorn exits on a failed startup
                await serving
            raise DedupError(f"could not serve on {host}:{port}")
        mode = "controls enabled" if token else "read-only"
        shown = f"[{host}]" if ":" in host else host
        click.echo(
            f"status page of namespace {target.namespace} at "
            f"http://{shown}:{sock.getsockname()[1]}/ ({mode}); Ctrl-C stops",
            err=target.as_json,
        )
        await serving

    try:
        asyncio.run(run())
    finally:
        sock.close()


# --- items -------------------------------------------------------------------------------
@cli.command()
@with_target
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, help="Per state.")
def items(target: Target, limit: int) -> None:
    """Running, queued and delayed flights: key, priority, attempts, age, executor."""
    found = observe(target, lambda o: o.get_queue_items(limit=limit))
    data = [report.item_view(i) for i in found]
    wide = Console().width >= 120
    title = f"flights of namespace {target.namespace}"
    emit(target, data, show.items_table(data, title, wide=wide))


# --- clear -------------------------------------------------------------------------------
@cli.command()
@with_target
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def clear(target: Target, yes: bool) -> None:
    """Remove every queued and delayed flight (running ones finish); their callers get
    QueueCleared."""
    if not yes:
        view = observe(target, lambda o: o.get_queue_status())
        waiting = view.queue_length + view.delayed
        question = (
            f"Remove {waiting} queued/delayed flight(s) from namespace {target.namespace!r} "
            f"at {redact(target.url)}?"
        )
        if not click.confirm(question, err=True):
            fail(EXIT_FAILED, "not cleared", as_json=target.as_json, kind="Declined")
    removed = observe(target, lambda o: o.clear_queue())
    if target.as_json:
        click.echo(json.dumps({"removed": removed}))
    else:
        click.echo(f"removed {removed} flight(s) from namespace {target.namespace}")


# --- config ------------------------------------------------------------------------------
@cli.group()
def config() -> None:
    """Read or change the namespace's shared config."""


@config.command("get")
@with_target
@click.argument("names", nargs=-1, metavar="[NAME]...")
def config_get(target: Target, names: tuple[str, ...]) -> None:
    """Print shared config (all of it, or the NAMEs)."""
    check_shared(dict.fromkeys(names, 1))  # names only: raises for one that is not shared
    values = observe(target, lambda o: o.shared_config())
    if names:
        values = {name: values[name] for name in names}
    emit(target, values, show.config_table(values, f"shared config of {target.namespace}"))


@config.command("set")
@with_target
@click.argument("assignments", nargs=-1, required=True, metavar="NAME=VALUE...")
def config_set(target: Target, assignments: tuple[str, ...]) -> None:
    """Change shared config for every instance, e.g. max_concurrent=10 retry_delay=0.5.
    All values are checked first: one bad value changes nothing."""
    values: dict[str, Any] = {}
    for text in assignments:
        name, eq, value = text.partition("=")
        if not eq or not name:
            raise ConfigError(f"expected NAME=VALUE, got {text!r}")
        name = name.strip()
        if name not in SHARED_FIELDS:
            raise ConfigError(
                f"{name!r} is not a shared setting; shared: {', '.join(SHARED_FIELDS)}"
            )
        values[name] = parse_env_value(name, value.strip(), label=name)
    check_shared(values)

    async def apply(observer: Observer) -> dict[str, Any]:
        await observer.update_config(**values)
        return await observer.shared_config()

    now = observe(target, apply)
    emit(target, now, show.config_table(now, f"shared config of {target.namespace}"))


# --- worker ------------------------------------------------------------------------------
@cli.command()
@with_target
@click.option(
    "--drain-timeout",
    type=click.FloatRange(0, min_open=True),
    help="Seconds running flights get to finish at shutdown (default: the config's).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
def worker(target: Target, drain_timeout: float | None, log_level: str) -> None:
    """Run a worker for queued HTTP requests until SIGTERM or SIGINT; then it stops
    taking flights, lets running ones finish (--drain-timeout) and hands the rest back.
    Logs flight events to stderr (JSON lines with --json)."""
    from dedupcall.core import Dedup
    from dedupcall.logfmt import install

    install(logging.getLevelName(log_level.upper()), as_json=target.as_json)
    log = logging.getLogger("dedupcall")

    def stop_now(sig: signal.Signals, instance_id: str) -> None:
        # A second signal: exit at once, like an unhandled one (128 + its number). Its
        # running flights are handed on when their lease runs out, as after a crash.
        log.warning(
            "dedupcall worker stopped at once by a second %s; running flights are handed "
            "on when their lease expires",
            sig.name,
            extra={"event": "killed", "instance_id": instance_id},
        )
        logging.shutdown()
        os._exit(128 + sig)

    async def run() -> None:
        dedup = Dedup(target.url, namespace=target.namespace, **target.config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await dedup.start()
        log.info(
            "dedupcall worker %s ready (namespace %s, %s)",
            dedup.instance_id,
            target.namespace,
            redact(target.url),
            extra={"instance_id": dedup.instance_id, "event": "ready"},
        )
        await stop.wait()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before saying so: no signal lost
            loop.add_signal_handler(sig, stop_now, sig, dedup.instance_id)
        iid = {"instance_id": dedup.instance_id}
        log.info("dedupcall worker stopping: draining", extra={"event": "stopping", **iid})
        await dedup.aclose(drain_timeout=drain_timeout)
        log.info("dedupcall worker stopped", extra={"event": "stopped", **iid})

    asyncio.run(run())


# --- demo --------------------------------------------------------------------------------
@cli.command()
@click.option("--instances", type=int, default=4, show_default=True, help="Instance processes.")
@click.option("--calls", type=int, default=200, show_default=True, help="Calls per instance.")
@click.option("--keys", type=int, default=5, show_default=True, help="Distinct API paths.")
@click.option("--delay", type=float, default=0.2, show_default=True, help="Upstream seconds.")
@click.option(
    "--url",
    metavar="URL",
    help="Redis URL (default: REDIS_URL, REDIS_HOST..., a server on 127.0.0.1:6379, "
    "else an embedded one).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo(
    instances: int, calls: int, keys: int, delay: float, url: str | None, as_json: bool
) -> None:
    """See dedupcall work: N instances fire duplicate calls at a slow local upstream,
    with and without dedup; prints calls made, upstream executions and latencies."""
    from dedupcall.demo.runner import DemoOptions
    from dedupcall.demo.runner import main as run_demo

    with handled(url, as_json):
        opts = DemoOptions(instances=instances, calls=calls, keys=keys, delay=delay, url=url)
    sys.exit(run_demo(opts, as_json=as_json))


def main(args: list[str] | None = None) -> None:
    """Run the CLI; click's own usage errors are a JSON object on stdout under ``--json``."""
    args = sys.argv[1:] if args is None else args
    try:
        code = cli.main(args, prog_name="dedupcall", standalone_mode=False)
    except click.ClickException as exc:
        if "--json" not in args:
            exc.show()
            sys.exit(exc.exit_code)
        kind = "UsageError" if isinstance(exc, click.UsageError) else type(exc).__name__
        click.echo(json.dumps({"error": kind, "message": exc.format_message()}))
        sys.exit(exc.exit_code)
    except click.Abort:
        fail(EXIT_FAILED, "aborted", as_json="--json" in args, kind="Aborted")
    sys.exit(code if isinstance(code, int) else 0)
