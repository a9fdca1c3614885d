"""KeySpace: the only place Redis key and channel names are built.

Every name shares the hash tag ``{namespace}``, so a namespace is one Redis Cluster
slot and every Lua script stays legal. User keys never appear in names: they are
hashed (``codec.key_digest``), so any bytes or length are safe.
"""

from __future__ import annotations

from dataclasses import dataclass

from dedupcall.config import validate_namespace


@dataclass(frozen=True)
class KeySpace:
    """Names of every Redis key and channel of one namespace."""

    namespace: str

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)

    @property
    def prefix(self) -> str:
        """Common prefix of every name; Lua scripts derive dynamic names from it."""
        return "{" + self.namespace + "}:"

    # structures without TTL
    @property
    def config(self) -> str:
        return self.prefix + "config"

    @property
    def queue(self) -> str:
        return self.prefix + "queue"

    @property
    def delayed(self) -> str:
        return self.prefix + "delayed"

    @property
    def running(self) -> str:
        return self.prefix + "running"

    @property
    def instances(self) -> str:
        return self.prefix + "instances"

    @property
    def seq(self) -> str:
        return self.prefix + "seq"

    @property
    def recovered(self) -> str:
        """The instances that answered a recovery pause (expires with the pause)."""
        return self.prefix + "recovered"

    # per flight / key / instance (names must match lua/lib.lua)
    def flight(self, request_id: str) -> str:
        return self.prefix + "f:" + request_id

    def holders(self, request_id: str) -> str:
        return self.prefix + "h:" + request_id

    def result(self, request_id: str) -> str:
        return self.prefix + "r:" + request_id

    def active(self, digest: str) -> str:
        return self.prefix + "k:" + digest

    def cache(self, digest: str) -> str:
        return self.prefix + "c:" + digest

    def held(self, instance_id: str) -> str:
        return self.prefix + "held:" + instance_id

    def instance_info(self, instance_id: str) -> str:
        return self.prefix + "inst:" + instance_id

    # channels
    @property
    def done_channel(self) -> str:
        return self.prefix + "done"

    @property
    def control_channel(self) -> str:
        return self.prefix + "ctl"

    def instance_channel(self, instance_id: str) -> str:
        return self.prefix + "i:" + instance_id
