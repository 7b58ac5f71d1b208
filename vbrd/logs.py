"""Structured logging: one line per record, ``key=value`` pairs, secrets redacted.

Every value the configuration holds as a secret is replaced by ``***`` in every record,
whatever code logged it — a password that slips into an exception message does not reach the
journal.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class Redactor(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets: list[str] = []

    def set_secrets(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redact(record.getMessage())
        record.args = ()
        if record.exc_info:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class StructuredFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = (f"time={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} "
                f"level={record.levelname.lower()} logger={record.name} "
                f"msg={json.dumps(record.getMessage())}")
        if record.exc_text:
            line += f" exc={json.dumps(record.exc_text)}"
        return line


REDACTOR = Redactor()


def setup_logging(level: str = "info", secrets: Iterable[str] = ()) -> None:
    REDACTOR.set_secrets(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter())
    handler.addFilter(REDACTOR)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
