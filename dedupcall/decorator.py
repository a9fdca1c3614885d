"""``@queued_api``: a sync or async function whose calls run once per API path across
every instance. A thin layer over ``Dedup.run_flight``; it never touches Redis itself."""

from __future__ import annotations

import inspect
import string
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import wrapt

from dedupcall.config import validate_call
from dedupcall.core import Dedup, RetryOn, exception_types
from dedupcall.entry import RedisErrorPolicy, checked, default_dedup
from dedupcall.errors import ConfigError, PathTemplateError, RedisUnavailable, SerializationError
from dedupcall.models import Result

F = TypeVar("F", bound=Callable[..., Any])
PathSpec = str | Callable[..., "str | bytes"]


class ResultCodec(Protocol):
    """Turns a function's value into JSON data for Redis and back (``codec=``)."""

    def encode(self, value: Any) -> Any:
        """The value as something ``json.dumps`` accepts."""

    def decode(self, data: Any) -> Any:
        """The value again, from what ``encode`` returned (after a JSON round trip)."""


class PathKey:
    """The key of one call: a ``str.format`` template filled from the bound arguments
    (defaults applied), or a callable given them as keyword arguments. Checked against
    the function's signature at decoration time."""

    def __init__(self, path: PathSpec, func: Callable[..., Any], name: str) -> None:
        self.name = name
        self.signature = inspect.signature(func)
        params = self.signature.parameters.values()
        self._var_kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
        # The fast path (no Signature.bind per call) for functions without *args,
        # **kwargs or positional-only parameters: most of them.
        simple = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)
        self._positional = (
            tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD) if simple else None
        )
        self._names = frozenset(self.signature.parameters)
        self._defaults = {p.name: p.default for p in params if p.default is not p.empty}
        self._template: str | None = None
        self._callable: Callable[..., str | bytes] | None = None
        if isinstance(path, str):
            self._check_template(path)
            self._template = path
        elif callable(path):
            self._check_callable(path)
            self._callable = path
        else:
            raise PathTemplateError(
                f"path= of {name} must be a str template or a callable, got {path!r}"
            )

    def _check_template(self, template: str) -> None:
        names = set(self.signature.parameters)
        for field in _fields(template, self.name):
            root = field.split(".", 1)[0].split("[", 1)[0]
            if root == "" or root.isdigit():
                raise PathTemplateError(
                    f"path {template!r} of {self.name} has a positional field {{{field}}}: "
                    "name the argument instead, e.g. {user_id}"
                )
            if root not in names and self._var_kw is None:
                raise PathTemplateError(
                    f"path {template!r} names {root!r}, which {self.name} has no parameter "
                    f"for (it has: {', '.join(names) or 'none'})"
                )

    def _check_callable(self, path: Callable[..., Any]) -> None:
        try:
            path_signature = inspect.signature(path)
        except (TypeError, ValueError):
            return  # a builtin without a signature: checked when called
        sample = {
            p.name: None for p in self.signature.parameters.values() if p.kind is not p.VAR_KEYWORD
        }
        try:
            path_signature.bind(**sample)
        except TypeError as exc:
            raise PathTemplateError(
                f"path callable of {self.name} must accept its arguments by name "
                f"({', '.join(sample) or 'none'}; add **_ to ignore some): {exc}"
            ) from None

    def arguments(
        self, instance: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> dict[str, Any]:
        # wrapt passes a method's self (or a classmethod's cls) as ``instance``; the
        # signature is the undecorated function's, which names it.
        full = args if instance is None else (instance, *args)
        positional = self._positional
        if positional is not None and len(full) <= len(positional):
            given = dict(zip(positional, full, strict=False))  # the first len(full) names
            if not kwargs or all(k in self._names and k not in given for k in kwargs):
                values = {**self._defaults, **given, **kwargs}
                if len(values) == len(self._names):
                    return values
            # else: missing or duplicate arguments; bind() raises the usual TypeError
        bound = self.signature.bind(*full, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        if self._var_kw is not None:
            values.update(values.pop(self._var_kw, {}))
        return values

    def __call__(
        self, instance: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> str | bytes:
        values = self.arguments(instance, args, kwargs)
        if self._template is not None:
            try:
                return self._template.format_map(values)
            except (KeyError, AttributeError, IndexError, ValueError, TypeError) as exc:
                raise PathTemplateError(
                    f"path {self._template!r} of {self.name} could not be filled from "
                    f"{sorted(values)}: {type(exc).__name__}: {exc}"
                ) from exc
        assert self._callable is not None
        try:
            key = self._callable(**values)
        except Exception as exc:
            raise PathTemplateError(
                f"path callable of {self.name} raised {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(key, (str, bytes)):
            raise PathTemplateError(
                f"path callable of {self.name} must return str or bytes, got {type(key).__name__}"
            )
        return key  # bytes stay bytes: the core hashes them exactly


def _fields(template: str, name: str) -> list[str]:
    """Every replacement field of a ``str.format`` template, nested ones included."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise PathTemplateError(f"path {template!r} of {name} is malformed: {exc}") from None
    out = []
    for _, field, spec, _ in parsed:
        if field is not None:
            out.append(field)
        if spec:
            out.extend(_fields(spec, name))
    return out


class _Call:
    """What a decorated function's calls share: options, key builder, codec, policy."""

    def __init__(
        self,
        func: Callable[..., Any],
        path: PathSpec,
        dedup: Dedup | None,
        flight: dict[str, Any],
        retry_on: tuple[type[BaseException], ...],
        result_codec: ResultCodec | None,
        policy: RedisErrorPolicy,
    ) -> None:
        self.name = f"{func.__module__}.{func.__qualname__}"
        self.key = PathKey(path, func, self.name)
        self.dedup = dedup
        self.flight = flight
        # A sync caller's timeout is kept by the bridge: a thread that runs the function
        # waits for its own value, whatever the timeout.
        self.timeout = flight["timeout"]
        self.sync_flight = {**flight, "timeout": None}
        self.retry_on = retry_on
        self.codec = result_codec
        self.policy = policy

    def encode(self, value: Any, key: str | bytes, dedup: Dedup) -> Any:
        if self.codec is None:
            return value
        try:
            return self.codec.encode(value)
        except Exception as exc:
            raise SerializationError(
                f"{self.name} returned a value its codec could not encode for key "
                f"{dedup.shown_key(key)!r}: {exc}"
            ) from exc

    def answer(self, result: Result, error: BaseException | None) -> Any:
        if not result.success:
            raise result.to_error() from error
        if self.codec is None:
            return result.data
        try:
            return self.codec.decode(result.data)
        except Exception as exc:
            raise SerializationError(
                f"{self.name}: its codec could not decode the result for key "
                f"{result.api_path!r}: {exc}"
            ) from exc


def queued_api(
    *,
    path: PathSpec,
    dedup: Dedup | None = None,
    priority: int = 0,
    ttl: float | None = None,
    timeout: float | None = None,
    retry_on: RetryOn = (),
    cache_failures: bool = False,
    codec: ResultCodec | None = None,
    on_redis_error: str = "raise",
) -> Callable[[F], F]:
    """Run the decorated function once per API path across every instance.

    ``path`` is a ``str.format`` template filled from the call's arguments (defaults
    applied), e.g. ``"/api/users/{user_id}"``, or a callable given them by name that
    returns the key. Every caller of a key, in any thread, coroutine or process, gets the
    one execution's value; a success answers later callers for ``ttl`` seconds (default:
    ``result_ttl``). Works on sync and async functions, methods, classmethods and
    staticmethods; a sync call blocks only its thread, and the function runs in the
    thread that opened the flight.

    The value must be JSON-serializable, or pass ``codec=`` (a ``ResultCodec``). Failures
    raise ``CallFailed`` for every caller (``__cause__`` is the original exception where
    it ran); ``retry_on`` names exception types worth another attempt. ``dedup``
    defaults to ``dedupcall.configure(...)``'s, else one from the environment.
    ``on_redis_error="bypass"`` calls the function directly while Redis is unreachable.
    Raises ``PathTemplateError`` here when ``path`` does not fit the function.
    """
    validate_call(priority, ttl, timeout)
    retry = exception_types(retry_on)
    policy = RedisErrorPolicy(on_redis_error)
    checked(dedup)
    if codec is not None and not (
        callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))
    ):
        raise ConfigError(f"codec= needs encode() and decode() methods, got {codec!r}")
    flight = {
        "priority": priority,
        "ttl": ttl,
        "timeout": timeout,
        "cache_failures": bool(cache_failures),
    }

    def decorate(func: F) -> F:
        raw = getattr(func, "__func__", func)  # inside a classmethod or staticmethod
        if not callable(raw):
            raise ConfigError(f"queued_api decorates functions, got {func!r}")
        if inspect.isgeneratorfunction(raw) or inspect.isasyncgenfunction(raw):
            raise ConfigError(
                f"queued_api cannot decorate the generator function {raw.__qualname__}: "
                "its value is an iterator, which cannot be shared; return a list instead"
            )
        call = _Call(raw, path, dedup, flight, retry, codec, policy)
        wrapper = _async_wrapper(call) if inspect.iscoroutinefunction(raw) else _sync_wrapper(call)
        return wrapper(func)  # type: ignore[no-any-return]

    return decorate


def _async_wrapper(call: _Call) -> Any:
    @wrapt.decorator
    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        key = call.key(instance, args, kwargs)
        dedup = call.dedup or default_dedup()
        if call.policy.skip(dedup):
            return await wrapped(*args, **kwargs)

        async def run() -> Any:
            return call.encode(await wrapped(*args, **kwargs), key, dedup)

        attempt = dedup.make_function_attempt(run, call.retry_on, call.name)
        try:
            result, error = await dedup.run_flight("function", key, attempt, **call.flight)
        except RedisUnavailable as exc:
            call.policy.failed(dedup, exc, key)
            return await wrapped(*args, **kwargs)
        return call.answer(result, error)

    return wrapper


def _sync_wrapper(call: _Call) -> Any:
    @wrapt.decorator
    def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        key = call.key(instance, args, kwargs)
        dedup = call.dedup or default_dedup()
        if call.policy.skip(dedup):
            return wrapped(*args, **kwargs)

        def run() -> Any:
            return call.encode(wrapped(*args, **kwargs), key, dedup)

        def start(run_in_caller: Callable[[], Any]) -> Any:
            attempt = dedup.make_function_attempt(run_in_caller, call.retry_on, call.name)
            return dedup.run_flight("function", key, attempt, **call.sync_flight)

        try:
            result, error = dedup.sync.call("function", key, run, start, call.timeout)
        except RedisUnavailable as exc:
            call.policy.failed(dedup, exc, key)
            return wrapped(*args, **kwargs)
        return call.answer(result, error)

    return wrapper
