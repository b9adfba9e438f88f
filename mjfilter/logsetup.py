"""Logging: the Postfix queue id on every line, CR/LF escaped, one summary per transaction."""

from __future__ import annotations

import contextvars
import logging
import sys

queue_id: contextvars.ContextVar[str] = contextvars.ContextVar("queue_id", default="-")

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(queue_id)s]: %(message)s"


class QueueIdFilter(logging.Filter):
    """Put the current transaction's queue id on the record (``%(queue_id)s``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.queue_id = queue_id.get()
        return True


class EscapingFormatter(logging.Formatter):
    """No log line can be split or forged by a CR/LF inside a logged value."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.exc_info:
            # keep tracebacks readable: escape only the message part
            head, sep, tail = text.partition("\nTraceback")
            return escape(head) + sep + tail
        return escape(text)


def escape(text: str) -> str:
    if "\r" in text or "\n" in text or "\0" in text:
        return text.replace("\r", "\\r").replace("\n", "\\n").replace("\0", "\\0")
    return text


def setup_logging(level: str = "info", stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.addFilter(QueueIdFilter())
    handler.setFormatter(EscapingFormatter(FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's chatty logger
