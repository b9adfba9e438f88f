"""Connection, envelope, message and transaction state.

Connection state lives as long as the SMTP connection; a ``Transaction`` is made
fresh at MAIL FROM (and after RSET/abort), so nothing of one message leaks into
the next on the same connection.

Headers are kept as ``(name, value)`` pairs with the value as *bytes*, exactly as
the MTA handed it over (8-bit text and RFC 2047 words survive). A folded value
keeps its line breaks as LF followed by white space, the form Postfix uses on the
milter protocol; ``Message.as_bytes`` writes CRLF.
"""

from __future__ import annotations

import hashlib
import itertools
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any
from collections.abc import Iterator

from .directives import Directives

DEFAULT_SPOOL_BYTES = 1 << 20  # bodies larger than this spool to a temp file

_connection_ids = itertools.count(1)


def _next_connection_id() -> int:
    return next(_connection_ids)


@dataclass(slots=True)
class Connection:
    """One SMTP client connection, as the MTA describes it."""

    hostname: str = "localhost"  # PTR name, or "[ip]" when there is none
    client_addr: str | None = None  # None for a local (non-SMTP) submission
    client_port: int | None = None
    helo: str | None = None
    macros: dict[str, str] = field(default_factory=dict)  # connect-time macros
    id: int = field(default_factory=_next_connection_id)


@dataclass(slots=True)
class Envelope:
    """SMTP envelope: sender (``""`` for the null sender) and recipients, no angle brackets."""

    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    sender_params: dict[str, str | None] = field(default_factory=dict)
    recipient_params: dict[str, dict[str, str | None]] = field(default_factory=dict)

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2].lower() if "@" in self.sender else ""


class Body:
    """A message body held in memory up to a threshold, spooled to a temp file past it."""

    __slots__ = ("_file", "_size")

    def __init__(self, data: bytes = b"", spool_bytes: int = DEFAULT_SPOOL_BYTES) -> None:
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=spool_bytes)
        self._size = 0
        if data:
            self.write(data)

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._size += len(chunk)

    @property
    def size(self) -> int:
        return self._size

    @property
    def spooled(self) -> bool:
        """True when the body went to disk."""
        return bool(getattr(self._file, "_rolled", False))

    def read(self) -> bytes:
        self._file.seek(0)
        return self._file.read()

    def chunks(self, size: int = 65536) -> Iterator[bytes]:
        self._file.seek(0)
        while chunk := self._file.read(size):
            yield chunk

    def sha256(self) -> str:
        h = hashlib.sha256()
        for chunk in self.chunks():
            h.update(chunk)
        return h.hexdigest()

    def close(self) -> None:
        self._file.close()


class Message:
    """RFC 5322 message: ordered header fields and a body.

    ``headers`` is a list of ``(name, value)`` with ``value`` bytes (no trailing
    line break). Names compare case-insensitively everywhere.
    """

    __slots__ = ("headers", "body")

    def __init__(self, headers: list[tuple[str, bytes]] | None = None, body: Body | None = None) -> None:
        self.headers: list[tuple[str, bytes]] = headers if headers is not None else []
        self.body: Body = body if body is not None else Body()

    # -- reading -------------------------------------------------------
    def get_all(self, name: str) -> list[bytes]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def get(self, name: str, default: bytes | None = None) -> bytes | None:
        lname = name.lower()
        for n, v in self.headers:
            if n.lower() == lname:
                return v
        return default

    def get_text(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name`` unfolded and decoded (UTF-8, errors replaced)."""
        value = self.get(name)
        if value is None:
            return default
        return unfold(value).decode("utf-8", "replace").strip()

    def occurrences(self, name: str) -> list[int]:
        """Indexes in ``headers`` of every field called ``name``."""
        lname = name.lower()
        return [i for i, (n, _) in enumerate(self.headers) if n.lower() == lname]

    # -- writing -------------------------------------------------------
    def header_bytes(self) -> bytes:
        out = bytearray()
        for name, value in self.headers:
            out += name.encode("ascii", "replace") + b": " + _crlf(value) + b"\r\n"
        return bytes(out)

    def as_bytes(self) -> bytes:
        """The whole message, CRLF line endings, as it would be queued."""
        return self.header_bytes() + b"\r\n" + self.body.read()

    @classmethod
    def from_bytes(cls, data: bytes, spool_bytes: int = DEFAULT_SPOOL_BYTES) -> "Message":
        """Parse a message the way an MTA splits it for a milter.

        Header values lose the white space after the colon; folded lines keep
        their break as LF + white space. The body is kept byte for byte with
        CRLF line endings.
        """
        if data.startswith(b"From ") and b"\n" in data:  # mbox separator line
            data = data.split(b"\n", 1)[1]
        sep = _find_header_end(data)
        head, body = (data, b"") if sep is None else (data[: sep[0]], data[sep[1]:])
        headers: list[tuple[str, bytes]] = []
        for line in head.replace(b"\r\n", b"\n").split(b"\n"):
            if not line:
                continue
            if line[:1] in (b" ", b"\t") and headers:
                prev_name, prev_value = headers[-1]
                headers[-1] = (prev_name, prev_value + b"\n" + line)
                continue
            raw_name, colon, value = line.partition(b":")
            if not colon:
                continue  # not a header line: an MTA would end the header here
            headers.append((raw_name.decode("ascii", "replace").strip(), value.lstrip(b" \t")))
        if b"\r\n" not in body and b"\n" in body:
            body = body.replace(b"\n", b"\r\n")
        return cls(headers, Body(body, spool_bytes))


def _find_header_end(data: bytes) -> tuple[int, int] | None:
    """(end of header, start of body) or None when there is no body."""
    candidates = [(i, i + n) for i, n in ((data.find(b"\r\n\r\n"), 4), (data.find(b"\n\n"), 2)) if i >= 0]
    if data.startswith(b"\r\n"):
        return (0, 2)
    if data.startswith(b"\n"):
        return (0, 1)
    if not candidates:
        return None
    start, end = min(candidates)
    # keep the header's last line break out of the header block
    return (start, end)


def _crlf(value: bytes) -> bytes:
    if b"\n" not in value:
        return value
    return value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def unfold(value: bytes) -> bytes:
    """Join folded header lines (CRLF or LF followed by white space)."""
    if b"\n" not in value:
        return value
    return value.replace(b"\r\n", b"\n").replace(b"\n", b"")


@dataclass(slots=True)
class Transaction:
    """One message: envelope, content, what the MTA told us, what the headers ask.

    ``state`` is scratch space for plugins, keyed by step name, discarded with the
    transaction. ``dry_run`` is true under ``mjfilter check`` without ``--commit``:
    a step should then decide as usual but leave nothing behind that outlives the
    run (the engine's own end-of-transaction undo covers reservations and events).
    """

    connection: Connection
    envelope: Envelope = field(default_factory=Envelope)
    message: Message = field(default_factory=Message)
    macros: dict[str, str] = field(default_factory=dict)
    queue_id: str | None = None
    auth_user: str | None = None
    directives: Directives = field(default_factory=Directives)
    state: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def client_addr(self) -> str | None:
        return self.connection.client_addr

    def fingerprint(self) -> str:
        """Identity of this message's content: Message-ID plus a hash of the body.

        The same message retried by a client gives the same fingerprint.
        """
        mid = (self.message.get_text("Message-ID") or "").encode()
        return hashlib.sha256(mid + b"\0" + self.message.body.sha256().encode()).hexdigest()[:32]
