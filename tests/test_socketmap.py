"""The socketmap server: against the real Postfix client (postmap -q) and over raw sockets.

The server runs in an event loop on a background thread; the tests talk to it
with blocking sockets or postmap subprocesses, every wait bounded.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mjfilter.frontends.socketmap import Answer, SocketmapServer, parse_request

POSTMAP = shutil.which("postmap") or "/usr/sbin/postmap"
needs_postmap = pytest.mark.skipif(not os.access(POSTMAP, os.X_OK), reason="Postfix postmap is not installed")
WAIT = 5.0  # seconds: the bound on every wait

TABLES = {
    "relayhost": {"user+tag@example.com": "[smtp.relay.example]:587"},
    "sasl": {"[smtp.relay.example]:587": "alice:s3cret with spaces"},
}


def table_lookup(name: str, key: str) -> Answer:
    if key == "temp-please":
        return Answer.temp("database unavailable")
    value = TABLES.get(name, {}).get(key)
    return Answer.ok(value) if value is not None else Answer.notfound()


# -- fixtures -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="socketmap-test-loop", daemon=True)
    thread.start()
    yield loop
    asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result(WAIT)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT)
    loop.close()


@pytest.fixture
def serve(loop: asyncio.AbstractEventLoop) -> Iterator[Callable[..., SocketmapServer]]:
    """Start a SocketmapServer in the loop thread; all are closed at teardown."""
    servers: list[SocketmapServer] = []

    def start(lookup: Callable[[str, str], Any] = table_lookup, address: str = "inet:127.0.0.1:0",
              **kw: Any) -> SocketmapServer:
        server = SocketmapServer(address, lookup, **kw)
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(WAIT)
        servers.append(server)
        return server

    yield start
    for server in servers:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(WAIT)


@pytest.fixture(scope="module")
def postfix_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config directory for ``postmap -c``: an empty main.cf is all it needs."""
    d = tmp_path_factory.mktemp("postfix")
    (d / "main.cf").write_text("")
    return d


def postmap(postfix_dir: Path, key: str, table: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([POSTMAP, "-c", str(postfix_dir), "-q", key, f"socketmap:{table}"],
                          check=False, capture_output=True, text=True, timeout=WAIT * 2)


def inet_port(server: SocketmapServer) -> int:
    assert server.address.startswith("inet:127.0.0.1:")
    return int(server.address.rsplit(":", 1)[1])


def connect(server: SocketmapServer) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", inet_port(server)), timeout=WAIT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def ns(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


def read_replies(sock: socket.socket, count: int) -> tuple[list[bytes], bool]:
    """Read up to ``count`` netstring payloads; also whether the server closed the connection."""
    buf, out = b"", list[bytes]()
    while len(out) < count:
        if b":" in buf:
            head, rest = buf.split(b":", 1)
            n = int(head)
            if len(rest) > n:
                assert rest[n:n + 1] == b","
                out.append(rest[:n])
                buf = rest[n + 1:]
                continue
        data = sock.recv(65536)
        if not data:
            assert buf == b""
            return out, True
        buf += data
    return out, False


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- pure functions -------------------------------------------------------------------
def test_parse_request() -> None:
    assert parse_request(b"sasl user+tag@example.com") == ("sasl", "user+tag@example.com")
    assert parse_request(b"t a key with spaces ") == ("t", "a key with spaces ")
    assert parse_request(b"t ") == ("t", "")
    assert parse_request(b"t \xff@x") == ("t", "\udcff@x")
    for bad in (b"nospace", b" key", b"", b"t k\0ey", b"t\x01x key"):
        with pytest.raises(ValueError):
            parse_request(bad)


def test_answer_encode() -> None:
    assert Answer.ok("user:pass").encode() == b"12:OK user:pass,"
    assert Answer.notfound().encode() == b"9:NOTFOUND ,"
    assert Answer.temp("down").encode() == b"9:TEMP down,"
    assert Answer.perm("no").encode() == b"7:PERM no,"
    assert Answer.ok("é").encode() == b"5:OK \xc3\xa9,"
    with pytest.raises(ValueError):
        Answer("MAYBE", "x")  # type: ignore[arg-type]


def test_address_forms(serve: Callable[..., SocketmapServer]) -> None:
    server = serve(address="inet:0@127.0.0.1")
    assert inet_port(server) > 0
    with pytest.raises(ValueError):
        SocketmapServer("tcp:127.0.0.1:1", table_lookup)


# -- the real Postfix client -------------------------------------------------------------
@needs_postmap
def test_postmap_ok_plus_and_at(serve: Callable[..., SocketmapServer], postfix_dir: Path) -> None:
    seen: list[tuple[str, str]] = []

    def lookup(name: str, key: str) -> Answer:
        seen.append((name, key))
        return table_lookup(name, key)

    server = serve(lookup)
    r = postmap(postfix_dir, "user+tag@example.com", f"{server.address}:relayhost")
    assert (r.returncode, r.stdout, r.stderr) == (0, "[smtp.relay.example]:587\n", "")
    r = postmap(postfix_dir, "[smtp.relay.example]:587", f"{server.address}:sasl")
    assert (r.returncode, r.stdout) == (0, "alice:s3cret with spaces\n")
    # Postfix sends the full key only, as given (no lower-casing, no partial keys)
    assert seen == [("relayhost", "user+tag@example.com"), ("sasl", "[smtp.relay.example]:587")]


@needs_postmap
def test_postmap_notfound(serve: Callable[..., SocketmapServer], postfix_dir: Path) -> None:
    server = serve()
    r = postmap(postfix_dir, "nobody@example.com", f"{server.address}:relayhost")
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "")


@needs_postmap
def test_postmap_temp(serve: Callable[..., SocketmapServer], postfix_dir: Path) -> None:
    server = serve()
    table = f"socketmap:{server.address}:sasl"
    r = postmap(postfix_dir, "temp-please", f"{server.address}:sasl")
    assert r.returncode != 0
    assert r.stdout == ""
    assert f"{table} socketmap server temporary error: database unavailable" in r.stderr
    assert f"table {table}: query error" in r.stderr


@needs_postmap
def test_postmap_unix_socket(serve: Callable[..., SocketmapServer], postfix_dir: Path,
                             tmp_path: Path) -> None:
    path = tmp_path / "run" / "socketmap.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a socket file nobody listens on
    stale.bind(str(path))
    stale.close()
    group = grp.getgrgid(os.getgid()).gr_name
    server = serve(address=f"unix:{path}", socket_group=group, socket_mode=0o640)
    assert server.address == f"unix:{path}"
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == os.getgid()
    r = postmap(postfix_dir, "user+tag@example.com", f"{server.address}:relayhost")
    assert (r.returncode, r.stdout) == (0, "[smtp.relay.example]:587\n")
    r = postmap(postfix_dir, "nobody@example.com", f"{server.address}:relayhost")
    assert (r.returncode, r.stdout) == (1, "")


def test_unix_socket_live_not_removed_and_removed_on_close(serve: Callable[..., SocketmapServer],
                                                          loop: asyncio.AbstractEventLoop,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = serve(address=f"unix:{path}")
    with pytest.raises(OSError, match="another server"):
        serve(address=f"unix:{path}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect(str(path))
        s.sendall(ns(b"relayhost user+tag@example.com"))
        assert read_replies(s, 1) == ([b"OK [smtp.relay.example]:587"], False)
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(WAIT)
    assert not path.exists()


# -- raw protocol ----------------------------------------------------------------------------
def test_pipelined_requests_answered_in_order(serve: Callable[..., SocketmapServer]) -> None:
    def lookup(name: str, key: str) -> Answer:
        if key == "slow":
            time.sleep(0.1)
        return Answer.ok(f"{name}/{key}")

    server = serve(lookup)
    with connect(server) as s:
        s.sendall(ns(b"a slow") + ns(b"b fast") + ns(b"c key with spaces"))
        replies, closed = read_replies(s, 3)
        assert replies == [b"OK a/slow", b"OK b/fast", b"OK c/key with spaces"]
        assert not closed
        s.sendall(ns(b"d again"))  # the connection stays usable
        assert read_replies(s, 1) == ([b"OK d/again"], False)


def test_netstring_split_across_sends(serve: Callable[..., SocketmapServer]) -> None:
    server = serve()
    with connect(server) as s:
        wire = ns(b"relayhost user+tag@example.com") + ns(b"relayhost nobody@example.com")
        for piece in (wire[:1], wire[1:3], wire[3:15], wire[15:34], wire[34:40], wire[40:]):
            s.sendall(piece)
            time.sleep(0.02)
        assert read_replies(s, 2) == ([b"OK [smtp.relay.example]:587", b"NOTFOUND "], False)


@pytest.mark.parametrize("wire", [b"abc:relayhost x,", b"11:relayhost x;", b" 5:t key,", b"-1:", b":,"])
def test_malformed_netstring_gets_perm_and_close(serve: Callable[..., SocketmapServer], wire: bytes) -> None:
    server = serve()
    with connect(server) as s:
        s.sendall(wire)
        assert read_replies(s, 2) == ([b"PERM malformed request"], True)


def test_oversized_request_gets_perm_and_close(serve: Callable[..., SocketmapServer]) -> None:
    server = serve(max_request=100)
    with connect(server) as s:
        s.sendall(ns(b"t " + b"k" * 98))  # exactly the limit: fine
        assert read_replies(s, 1) == ([b"NOTFOUND "], False)
        s.sendall(b"101:")
        assert read_replies(s, 2) == ([b"PERM malformed request"], True)
    with connect(server) as s:
        s.sendall(b"99999999")  # a length with too many digits: no need to wait for the ':'
        assert read_replies(s, 2) == ([b"PERM malformed request"], True)


def test_bad_payload_in_good_netstring_keeps_connection(serve: Callable[..., SocketmapServer]) -> None:
    server = serve()
    with connect(server) as s:
        s.sendall(ns(b"nospace") + ns(b"relayhost user+tag@example.com"))
        assert read_replies(s, 2) == ([b"PERM malformed request", b"OK [smtp.relay.example]:587"], False)


def test_idle_client_dropped(serve: Callable[..., SocketmapServer]) -> None:
    server = serve(timeout=0.3)
    with connect(server) as s:
        s.sendall(ns(b"relayhost nobody@example.com"))
        assert read_replies(s, 1) == ([b"NOTFOUND "], False)
        t0 = time.monotonic()
        assert closed_by_server(s)
        assert 0.2 < time.monotonic() - t0 < 2.0
    with connect(server) as s:  # a request that never completes is dropped too
        s.sendall(b"30:relayhost no")
        t0 = time.monotonic()
        assert closed_by_server(s)
        assert time.monotonic() - t0 < 2.0


def test_raising_lookup_gets_temp_and_server_keeps_serving(serve: Callable[..., SocketmapServer],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    def lookup(name: str, key: str) -> Answer:
        if name == "boom":
            raise RuntimeError("database exploded")
        return Answer.ok("fine")

    server = serve(lookup)
    with caplog.at_level(logging.INFO, logger="mjfilter.socketmap"), connect(server) as s:
        s.sendall(ns(b"boom secret-key@example.com"))
        assert read_replies(s, 1) == ([b"TEMP internal error"], False)
        s.sendall(ns(b"other key"))
        assert read_replies(s, 1) == ([b"OK fine"], False)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    msg = errors[0].getMessage()
    assert "'boom'" in msg and "RuntimeError: database exploded" in msg
    assert "secret-key" not in caplog.text


@pytest.mark.parametrize("answer, reply", [
    (Answer.ok("line1\nline2"), b"TEMP bad reply from lookup"),
    (Answer.ok("a\rb"), b"TEMP bad reply from lookup"),
    (Answer.ok("a\0b"), b"TEMP bad reply from lookup"),
    (Answer.ok(""), b"TEMP bad reply from lookup"),
    ("not an Answer", b"TEMP bad reply from lookup"),
    (Answer.ok("x" * 99997), b"OK " + b"x" * 99997),  # exactly 100000 bytes
    (Answer.ok("x" * 99998), b"PERM reply too long"),
    (Answer.temp("multi\nline"), b"TEMP multi line"),
    (Answer("NOTFOUND", "ignored"), b"NOTFOUND "),
    (Answer.timeout("slow"), b"TIMEOUT slow"),
])
def test_bad_or_odd_replies(serve: Callable[..., SocketmapServer], answer: Any, reply: bytes) -> None:
    server = serve(lambda name, key: answer)
    with connect(server) as s:
        s.sendall(ns(b"t k"))
        assert read_replies(s, 1) == ([reply], False)


def test_blocking_lookup_does_not_stall_other_connections(serve: Callable[..., SocketmapServer]) -> None:
    release = threading.Event()

    def lookup(name: str, key: str) -> Answer:
        if key == "block":
            release.wait(WAIT)
        return Answer.ok(key)

    server = serve(lookup)
    with connect(server) as slow, connect(server) as fast:
        slow.sendall(ns(b"t block"))
        time.sleep(0.05)
        fast.sendall(ns(b"t quick"))
        assert read_replies(fast, 1) == ([b"OK quick"], False)
        release.set()
        assert read_replies(slow, 1) == ([b"OK block"], False)


def test_close_drops_connected_clients(serve: Callable[..., SocketmapServer],
                                       loop: asyncio.AbstractEventLoop) -> None:
    server = serve()
    with connect(server) as s:
        s.sendall(ns(b"relayhost nobody@example.com"))
        assert read_replies(s, 1) == ([b"NOTFOUND "], False)
        t0 = time.monotonic()
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(WAIT)
        assert closed_by_server(s)
        assert time.monotonic() - t0 < 2.0
    with pytest.raises(OSError):
        connect(server)
