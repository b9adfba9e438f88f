"""A Postfix ``socketmap:`` table server (asyncio): the protocol layer.

Postfix asks mjfilter for per-sender relay hosts and the SASL credentials that
go with them through this server, e.g. in ``main.cf``::

    smtp_sasl_password_maps = socketmap:inet:127.0.0.1:8895:sasl
    sender_dependent_relayhost_maps = socketmap:inet:127.0.0.1:8895:relayhost

(``socketmap:unix:/PATH:NAME`` for a unix socket). What the tables contain is
the business of the ``lookup`` callable; this module only speaks the protocol.

Postfix sends the full lookup key only: unlike ``hash:`` tables it does not
retry with partial keys (the domain alone, the address without its extension,
...), so a lookup that wants such fallbacks makes them itself.

Protocol (``man 5 socketmap_table``): every request and every reply is one
netstring, ``LEN:PAYLOAD,`` where LEN is the decimal byte count of PAYLOAD.

* request payload: ``NAME KEY`` -- the table name, one space, the key (the key
  may itself contain spaces);
* reply payload: ``OK DATA``, ``NOTFOUND ``, ``TEMP REASON``,
  ``TIMEOUT REASON`` or ``PERM REASON``, at most 100000 bytes.

Postfix keeps the connection open and sends request after request, one at a
time; this server also copes with partial reads and pipelined requests, answers
in order, drops idle clients after ``timeout`` seconds, and closes the
connection after a malformed netstring (with one ``PERM malformed request``
reply). The ``lookup`` is synchronous and may block (SQL, a store): it runs in
an executor so that one slow lookup does not stall the other connections.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import socket
import stat
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import parse_listen

log = logging.getLogger("mjfilter.socketmap")

Status = Literal["OK", "NOTFOUND", "TEMP", "TIMEOUT", "PERM"]
STATUSES: frozenset[str] = frozenset({"OK", "NOTFOUND", "TEMP", "TIMEOUT", "PERM"})
MAX_REPLY = 100000  # bytes of reply payload Postfix accepts (the netstring framing not counted)
CLOSE_GRACE = 1.0  # seconds close() waits for connection handlers to finish
_READ_SIZE = 65536
_FORBIDDEN = re.compile("[\r\n\0]")


@dataclass(frozen=True, slots=True)
class Answer:
    """One socketmap reply: a status and its data (``OK``) or reason (``TEMP``, ``TIMEOUT``, ``PERM``)."""

    status: Status
    data: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"socketmap status {self.status!r} is not one of {sorted(STATUSES)}")
        if not isinstance(self.data, str):
            raise TypeError(f"socketmap data must be str, not {type(self.data).__name__}")

    @classmethod
    def ok(cls, data: str) -> Answer:
        return cls("OK", data)

    @classmethod
    def notfound(cls) -> Answer:
        return cls("NOTFOUND")

    @classmethod
    def temp(cls, reason: str) -> Answer:
        return cls("TEMP", reason)

    @classmethod
    def timeout(cls, reason: str) -> Answer:
        return cls("TIMEOUT", reason)

    @classmethod
    def perm(cls, reason: str) -> Answer:
        return cls("PERM", reason)

    def payload(self) -> bytes:
        """``STATUS DATA`` as bytes (UTF-8, surrogateescape so keys' bytes round-trip)."""
        return f"{self.status} {self.data}".encode("utf-8", "surrogateescape")

    def encode(self) -> bytes:
        """The netstring Postfix reads. Encodes as is: the server checks data and length first."""
        payload = self.payload()
        return b"%d:%s," % (len(payload), payload)


Lookup = Callable[[str, str], Answer]
# With ``with_connection=True`` the lookup also gets the number of the client connection
# (Postfix keeps one connection per process and table, e.g. per cleanup process).
ConnectionLookup = Callable[[str, str, int], Answer]
"""``(name, key) -> Answer``; synchronous, may block (run in an executor)."""

NOTFOUND = Answer.notfound()
MALFORMED = Answer.perm("malformed request")
INTERNAL_ERROR = Answer.temp("internal error")
BAD_REPLY = Answer.temp("bad reply from lookup")
TOO_LONG = Answer.perm("reply too long")


def parse_request(payload: bytes) -> tuple[str, str]:
    """A request payload ``b"NAME KEY"`` -> ``(name, key)``, split at the first space.

    The key is kept as sent (it may contain spaces, and may be empty); bytes that
    are not UTF-8 survive as surrogate escapes. Raises ValueError on a payload
    without a space, an empty or non-printable name, or a NUL byte.
    """
    if b"\0" in payload:
        raise ValueError("NUL byte in socketmap request")
    name_b, sep, key_b = payload.partition(b" ")
    if not sep:
        raise ValueError("socketmap request has no space between name and key")
    if not name_b or not all(0x21 <= c <= 0x7E for c in name_b):
        raise ValueError("socketmap request has an empty or non-printable table name")
    return name_b.decode("ascii"), key_b.decode("utf-8", "surrogateescape")


class _Malformed(Exception):
    """The byte stream is not a netstring sequence (or one is too long)."""


def _take_netstring(buf: bytearray, max_len: int) -> bytes | None:
    """Remove and return the first complete netstring payload in ``buf``; None if more bytes are needed."""
    max_digits = len(str(max_len))
    colon = buf.find(b":", 0, max_digits + 1)
    if colon < 0:
        head = bytes(buf[: max_digits + 1])
        if len(head) > max_digits or (head and not head.isdigit()):
            raise _Malformed("bad netstring length")
        return None
    digits = bytes(buf[:colon])
    if not digits or not digits.isdigit():
        raise _Malformed("bad netstring length")
    length = int(digits)
    if length > max_len:
        raise _Malformed(f"request of {length} bytes (limit {max_len})")
    end = colon + 1 + length
    if len(buf) <= end:
        return None
    if buf[end] != ord(","):
        raise _Malformed("netstring without its ','")
    payload = bytes(buf[colon + 1 : end])
    del buf[: end + 1]
    return payload


def _parse_address(spec: str) -> tuple[str, str | None, int | None, str | None]:
    """``parse_listen``, plus port 0 (``inet:HOST:0``, ``inet:0@HOST``): let the kernel pick a port."""
    try:
        return parse_listen(spec)
    except ValueError:
        m = re.fullmatch(r"(inet6?:)(?:0+@(.+)|(.+):0+)", spec)
        if m is None:
            raise
        kind, host, _, _ = parse_listen(f"{m[1]}1@{m[2]}" if m[2] is not None else f"{m[1]}{m[3]}:1")
        return (kind, host, 0, None)


def _inet_address(sockname: tuple[object, ...]) -> str:
    host, port = str(sockname[0]), int(str(sockname[1]))
    return f"inet:[{host}]:{port}" if ":" in host else f"inet:{host}:{port}"


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead server; refuse to touch a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket: not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with suppress(FileNotFoundError):
            os.unlink(path)
        log.info("removed stale socket %s", path)
        return
    except OSError:
        pass  # e.g. a full backlog: somebody is there
    finally:
        probe.close()
    raise OSError(f"{path}: another server is listening on this socket")


class SocketmapServer:
    """Serve ``lookup`` to Postfix socketmap clients on ``address``."""

    def __init__(
        self,
        address: str,
        lookup: Lookup | ConnectionLookup,
        *,
        with_connection: bool = False,
        inline: Callable[[str, str], bool] | None = None,
        timeout: float = 10.0,
        max_request: int = 100000,
        executor: concurrent.futures.Executor | None = None,
        socket_group: str | None = None,
        socket_mode: int = 0o660,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_request < 1:
            raise ValueError("max_request must be positive")
        self._parsed = _parse_address(address)  # fail early on a bad address
        self._lookup = lookup
        self._with_connection = with_connection
        # (name, key) -> True when the lookup cannot block: answered on the event loop,
        # without the hop to an executor thread (most lookups of a busy Postfix).
        self._inline = inline
        self._serial = 0
        self._timeout = timeout
        self._max_request = max_request
        self._executor = executor
        self._socket_group = socket_group
        self._socket_mode = socket_mode
        self._server: asyncio.base_events.Server | None = None
        self._address = address
        self._unix_inode: tuple[int, int] | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = False

    @property
    def address(self) -> str:
        """The bound address, ``inet:HOST:PORT`` or ``unix:PATH`` (the configured one before start)."""
        return self._address

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("socketmap server already started")
        kind, host, port, path = self._parsed
        if kind == "unix":
            assert path is not None
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_socket(path)
            server = await asyncio.start_unix_server(self._handle, path=path)
            try:
                st = os.lstat(path)
                # lazy: the milter module imports pymilter and the app
                from .milter import _socket_permissions

                _socket_permissions(path, self._socket_group, self._socket_mode)
            except BaseException:
                server.close()
                with suppress(OSError):
                    os.unlink(path)
                raise
            self._server, self._unix_inode = server, (st.st_dev, st.st_ino)
            self._address = f"unix:{path}"
        else:
            self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
            self._address = _inet_address(self._server.sockets[0].getsockname())
        log.info("socketmap listening on %s", self._address)

    async def close(self) -> None:
        """Stop accepting, close the client connections, wait briefly for their handlers."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._closing = True
        # Closing the transport ends an idle handler (end of stream); one in a
        # lookup gets the grace time to finish, then is cancelled.
        for writer in self._connections.values():
            writer.close()
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_GRACE)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=CLOSE_GRACE)
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), CLOSE_GRACE)
        kind, _, _, path = self._parsed
        if kind == "unix" and path and self._unix_inode is not None:
            with suppress(OSError):
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == self._unix_inode:
                    os.unlink(path)
            self._unix_inode = None
        log.info("socketmap on %s closed", self._address)

    # -- one connection ------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        self._serial += 1
        conn = self._serial
        buf = bytearray()
        try:
            while True:
                try:
                    async with asyncio.timeout(self._timeout):
                        payload = await self._read_request(reader, buf)
                except TimeoutError:
                    log.debug("socketmap client idle for %gs: closing", self._timeout)
                    return
                except _Malformed as e:
                    log.warning("socketmap: malformed request (%s): closing the connection", e)
                    writer.write(MALFORMED.encode())
                    async with asyncio.timeout(self._timeout):
                        await writer.drain()
                    return
                if payload is None:
                    return
                writer.write(await self._answer(payload, conn))
                async with asyncio.timeout(self._timeout):
                    await writer.drain()
        except (OSError, TimeoutError):
            pass  # the client went away or stopped reading
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # close() cancelled us: end quietly (3.11's start_server callback
            # would log a cancelled handler as an unhandled exception)
        finally:
            self._connections.pop(task, None)
            writer.close()
            with suppress(Exception):
                async with asyncio.timeout(CLOSE_GRACE):
                    await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader, buf: bytearray) -> bytes | None:
        """The next request payload; None at end of stream."""
        while True:
            payload = _take_netstring(buf, self._max_request)
            if payload is not None:
                return payload
            data = await reader.read(_READ_SIZE)
            if not data:
                if buf:
                    log.debug("socketmap client closed in the middle of a request")
                return None
            buf += data

    async def _answer(self, payload: bytes, conn: int = 0) -> bytes:
        try:
            name, key = parse_request(payload)
        except ValueError as e:
            log.warning("socketmap: %s", e)
            return MALFORMED.encode()
        loop = asyncio.get_running_loop()
        try:
            args = (name, key, conn) if self._with_connection else (name, key)
            if self._inline is not None and self._inline(name, key):
                answer = self._lookup(*args)  # type: ignore[call-arg]
            else:
                answer = await loop.run_in_executor(self._executor, self._lookup, *args)
        except Exception as e:
            # Name and exception only: the key may be an address or a credential selector.
            log.error("socketmap lookup in table %r failed: %s: %s", name, type(e).__name__, e)
            log.debug("socketmap lookup traceback", exc_info=True)
            return INTERNAL_ERROR.encode()
        return self._checked(name, answer).encode()

    def _checked(self, name: str, answer: object) -> Answer:
        """The answer if Postfix can take it, else a TEMP/PERM that says what went wrong."""
        if not isinstance(answer, Answer):
            log.error("socketmap lookup in table %r returned %s, not an Answer", name, type(answer).__name__)
            return BAD_REPLY
        if answer.status == "NOTFOUND":
            return NOTFOUND  # Postfix wants "NOTFOUND " exactly
        if answer.status == "OK":
            if _FORBIDDEN.search(answer.data):
                log.error("socketmap lookup in table %r returned data with CR, LF or NUL", name)
                return BAD_REPLY
            if not answer.data:
                # Postfix refuses empty results ("should return NO RESULT in case of NOT FOUND").
                log.error("socketmap lookup in table %r returned OK with empty data", name)
                return BAD_REPLY
        elif _FORBIDDEN.search(answer.data):
            answer = Answer(answer.status, _FORBIDDEN.sub(" ", answer.data))  # only descriptive text
        if len(answer.payload()) > MAX_REPLY:
            log.error("socketmap lookup in table %r returned a reply over %d bytes", name, MAX_REPLY)
            return TOO_LONG
        return answer
