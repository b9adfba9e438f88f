"""Logging: the Postfix queue id on every line, CR/LF escaped, one summary per transaction.

Lines go to standard error (with a timestamp) or to the local syslog daemon
(``logging.target: syslog``; ident ``mjfilter[PID]``, the configured facility,
no timestamp: syslog adds its own).
"""

from __future__ import annotations

import contextvars
import copy
import logging
import queue
import logging.handlers
import os
import socket
import sys

queue_id: contextvars.ContextVar[str] = contextvars.ContextVar("queue_id", default="-")

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(queue_id)s]: %(message)s"
SYSLOG_FORMAT = "%(levelname)s %(name)s[%(queue_id)s]: %(message)s"
SYSLOG_IDENT = "mjfilter"


class QueueIdFilter(logging.Filter):
    """Put the current transaction's queue id on the record (``%(queue_id)s``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.queue_id = queue_id.get()
        return True


class EscapingFormatter(logging.Formatter):
    """No log line can be split or forged by a CR/LF inside a logged value."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.exc_info or record.exc_text:
            # keep tracebacks readable: escape only the message part
            head, sep, tail = text.partition("\nTraceback")
            return escape(head) + sep + tail
        return escape(text)


def escape(text: str) -> str:
    if "\r" in text or "\n" in text or "\0" in text:
        return text.replace("\r", "\\r").replace("\n", "\\n").replace("\0", "\\0")
    return text


def syslog_handler(facility: str = "mail", address: str = "/dev/log") -> logging.Handler:
    """A handler that sends to the syslog daemon's unix socket ``address``.

    Like openlog(3), it does not fail when nothing listens there yet: it
    connects again on every line until the syslog daemon answers.
    """
    handler = logging.handlers.SysLogHandler(address=address,
                                             facility=logging.handlers.SysLogHandler.facility_names[facility])
    handler.ident = f"{SYSLOG_IDENT}[{os.getpid()}]: "
    handler.setFormatter(EscapingFormatter(SYSLOG_FORMAT))
    return handler


def syslog_problem(address: str) -> str | None:
    """Why the syslog socket ``address`` cannot take log lines now, or None when it can."""
    last: OSError | None = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(address)
                return None
            except OSError as e:
                last = e
    return f"syslog socket {address} does not answer: {last.strerror if last and last.strerror else last}"


class BackgroundHandler(logging.handlers.QueueHandler):
    """Hands records to one writer thread, so milter threads never wait on the output's lock.

    The record is completed in the logging thread (message merged, queue id and
    traceback text attached); ``close`` stops the writer after it wrote everything.
    """

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(queue.SimpleQueue())
        self.listener = logging.handlers.QueueListener(self.queue, target, respect_handler_level=True)
        self.listener.start()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record

    def close(self) -> None:
        self.listener.stop()  # writes what is queued, then ends the thread
        for h in self.listener.handlers:
            h.close()
        super().close()


def shutdown_logging() -> None:
    """Flush and stop a background writer (``setup_logging(background=True)``)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, BackgroundHandler):
            root.removeHandler(h)
            h.close()


def setup_logging(level: str = "info", stream: object = None, target: str = "stderr", facility: str = "mail",
                  syslog_socket: str = "/dev/log", background: bool = False) -> str | None:
    """Send every log line to ``target`` (``stderr``: ``stream`` or standard error; ``syslog``).

    ``background``: write from one thread of its own (the daemon: a milter
    thread must not wait on the log output); call ``shutdown_logging`` before
    exiting. Returns a warning for the caller to print on standard error when
    ``target`` is syslog and ``syslog_socket`` does not answer now (lines are
    lost until it does).
    """
    handler: logging.Handler
    problem = None
    if target == "syslog":
        problem = syslog_problem(syslog_socket)
        handler = syslog_handler(facility, syslog_socket)
    else:
        handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
        handler.setFormatter(EscapingFormatter(FORMAT))
    shutdown_logging()
    if background:
        handler = BackgroundHandler(handler)
    handler.addFilter(QueueIdFilter())  # in the logging thread, where the queue id is set
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        if isinstance(h, logging.handlers.SysLogHandler):
            h.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's chatty logger
    return problem
