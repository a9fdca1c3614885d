"""Log output for ``dedupcall worker``: readable lines, or JSON lines with ``--json``,
each carrying the flight fields (``event``, ``request_id``, ``key``, ``instance_id``,
``attempt``) that ``dedupcall.events`` attaches."""

from __future__ import annotations

import json
import logging
import sys

FIELDS = ("event", "request_id", "key", "instance_id", "attempt")


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the flight fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def install(level: int, *, as_json: bool = False) -> logging.Handler:
    """Send the ``dedupcall`` logger's records at ``level`` and above to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    log = logging.getLogger("dedupcall")
    log.addHandler(handler)
    log.setLevel(level)
    return handler
