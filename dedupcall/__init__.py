"""dedupcall: many instances of a service, one upstream call per API path.

Explicit imports and a sorted ``__all__``; no logic here.
"""

from dedupcall.aio import to_thread
from dedupcall.asgi import lifespan
from dedupcall.config import Config
from dedupcall.core import Dedup
from dedupcall.decorator import ResultCodec, queued_api
from dedupcall.entry import configure
from dedupcall.errors import (
    CallFailed,
    ConfigError,
    ConflictError,
    DedupError,
    EngineNotFound,
    FlightDropped,
    LeaseLost,
    PathTemplateError,
    QueueCleared,
    RedisUnavailable,
    ResponseTooLarge,
    SerializationError,
    TransportCallFailed,
    UnknownRequest,
    WaitTimeout,
)
from dedupcall.models import InstanceInfo, QueueItem, QueueStatus, Result
from dedupcall.observer import Observer
from dedupcall.transport import AsyncDedupTransport, DedupTransport

__all__ = [
    "AsyncDedupTransport",
    "CallFailed",
    "Config",
    "ConfigError",
    "ConflictError",
    "Dedup",
    "DedupError",
    "DedupTransport",
    "EngineNotFound",
    "FlightDropped",
    "InstanceInfo",
    "LeaseLost",
    "Observer",
    "PathTemplateError",
    "QueueCleared",
    "QueueItem",
    "QueueStatus",
    "RedisUnavailable",
    "ResponseTooLarge",
    "Result",
    "ResultCodec",
    "SerializationError",
    "TransportCallFailed",
    "UnknownRequest",
    "WaitTimeout",
    "configure",
    "lifespan",
    "queued_api",
    "to_thread",
]

__version__ = "0.1.0"
