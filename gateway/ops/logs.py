"""Log set-up shared by ``gateway serve`` and ``gateway probe``: text or JSON lines on
stderr, JSON lines carrying each ``key=%x`` of the format string as a typed field; and the
one-line fatal error both commands print before logging is set up."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "log_fields", "print_error", "setup_logging"]

#: a %-placeholder, optionally named by the ``key=`` just before it ("peer=%s")
_PLACEHOLDER = re.compile(
    r"(?:(?<![\w.])([a-z_][a-z0-9_]*)=)?%(?:\([^)]*\))?[-#0 +]*(?:\d+|\*)?(?:\.(?:\d+|\*))?"
    r"[hlL]?([diouxXeEfFgGcrsa%])"
)
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def log_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Structured fields of a log call: each ``key=%x`` of the format string with its
    argument (typed: ints stay ints), the text before the first one as ``event``, and
    anything passed with ``extra=``."""
    out: dict[str, Any] = {}
    args = record.args
    if isinstance(record.msg, str) and isinstance(args, tuple) and args:
        i = 0
        first = None
        for m in _PLACEHOLDER.finditer(record.msg):
            if m.group(2) == "%":
                continue
            if i >= len(args):
                break
            if m.group(1):
                value = args[i]
                out[m.group(1)] = (
                    value if isinstance(value, (int, float, bool, type(None))) else str(value)
                )
                if first is None:
                    first = m.start()
            i += 1
        prefix = record.msg[:first].strip() if first is not None else ""
        if prefix and "%" not in prefix:
            out["event"] = prefix
    for key, value in vars(record).items():
        if key not in _RECORD_ATTRS and not key.startswith("_"):
            out[key] = value
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in log_fields(record).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class _WorkerName(logging.Filter):
    """Names the worker process (``--workers N``) in every line: a ``worker`` attribute,
    which the JSON formatter writes as a field and the text format as ``worker=w3``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.worker = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def setup_logging(fmt: str, level: str, worker: str | None = None) -> None:
    """Log lines on stderr, text or JSON; ``worker``: the worker process's name (``w3``),
    in every line (text: ``worker=w3`` before the message; JSON: a ``"worker"`` field)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        tag = f"worker={worker} " if worker else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s %(name)s {tag}%(message)s")
        )
    if worker:
        handler.addFilter(_WorkerName(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def print_error(text: str, fmt: str = "text", level: str = "error", prog: str = "gateway") -> None:
    """A fatal error or a warning on stderr: ``gateway: error: ...``, or one JSON line
    (``--log-format json``: every stderr line is JSON)."""
    if fmt == "json":
        doc = {
            "ts": round(time.time(), 6),
            "level": level,
            "logger": prog.replace(" ", "."),
            "msg": text,
            "event": "fatal" if level == "error" else level,
        }
        line = json.dumps(doc)
    else:
        line = f"{prog}: {level}: {text}"
    print(line, file=sys.stderr, flush=True)
