"""Logging setup: human text or JSON lines, with the audit record flattened into each line."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from typing import Any

from cowork.defaults import LOG_FILE_MAX_BYTES


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            out.update(audit)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = f"{self.formatTime(record)} {record.levelname.lower():7} {record.getMessage()}"
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            base += " " + " ".join(f"{k}={v!r}" for k, v in audit.items())
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


def setup(fmt: str, level: str, path: str | None, max_bytes: int = LOG_FILE_MAX_BYTES) -> None:
    """Log to `path` (rolled over at `max_bytes`, one older file kept) or to stderr.

    Under systemd stderr goes to the journal, which bounds itself; a file (the
    local agent's) must be bounded here, since every RPC adds a line for weeks.
    """
    handler: logging.Handler = (
        logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=1)
        if path
        else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
