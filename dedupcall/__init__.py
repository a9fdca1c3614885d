"""dedupcall: many instances of a service, one upstream call per API path.

Explicit imports and a sorted ``__all__``; no logic here.
"""

from dedupcall.config import Config
from dedupcall.core import Dedup
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
    UnknownRequest,
    WaitTimeout,
)
from dedupcall.models import InstanceInfo, QueueItem, QueueStatus, Result

__all__ = [
    "CallFailed",
    "Config",
    "ConfigError",
    "ConflictError",
    "Dedup",
    "DedupError",
    "EngineNotFound",
    "FlightDropped",
    "InstanceInfo",
    "LeaseLost",
    "PathTemplateError",
    "QueueCleared",
    "QueueItem",
    "QueueStatus",
    "RedisUnavailable",
    "ResponseTooLarge",
    "Result",
    "SerializationError",
    "UnknownRequest",
    "WaitTimeout",
]

__version__ = "0.1.0"
