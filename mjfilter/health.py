"""``mjfilter health``: does the running daemon answer, and what it depends on?

Each check returns a ``Check`` (name, ok, one-line detail); none raises. The
milter check speaks the first exchange of the milter protocol (option
negotiation, then quit), the way an MTA opens a connection, so a daemon whose
listening socket still accepts connections but whose milter threads no longer
answer is reported as failing.
"""

from __future__ import annotations

import socket
import struct
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from .config import LoadedConfig, parse_listen
from .control import send_command
from .store import StoreUnavailable, open_store

MILTER_VERSION = 6  # what Postfix 2.6+ and Sendmail 8.14+ speak
_ALL_ACTIONS = 0x1FF  # SMFI_CURR_ACTS
_ALL_PROTOCOL = 0x1FFFFF  # every SMFIP_* step flag of version 6


@dataclass(frozen=True, slots=True)
class Check:
    check: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "ok": self.ok, "detail": self.detail}


def check_daemon(loaded: LoadedConfig, timeout: float) -> Check:
    """The control socket answers ``status`` and the daemon is not shutting down."""
    path = loaded.config.control_socket
    try:
        reply = send_command(path, "status", timeout=timeout)
    except (OSError, ValueError) as e:
        return Check("daemon", False, f"no daemon answers on {path}: {getattr(e, 'strerror', None) or e}")
    if not reply.get("ok"):
        return Check("daemon", False, f"{path}: {reply.get('error', 'status refused')}")
    detail = (f"pid {reply.get('pid')}, configuration generation {reply.get('generation')}, "
              f"{reply.get('in_flight', '?')} in flight")
    if reply.get("draining"):
        return Check("daemon", False, f"shutting down ({detail})")
    return Check("daemon", True, detail)


def check_store(loaded: LoadedConfig, timeout: float) -> Check:
    """The store answers a ping within ``timeout`` (or store.timeout, the shorter)."""
    cfg = loaded.config
    try:
        store = open_store(cfg.store_url, min(timeout, cfg.store.timeout), base=loaded.path.resolve().parent,
                           prefix=cfg.store.prefix)
    except (StoreUnavailable, ValueError) as e:
        return Check("store", False, str(e))
    try:
        t0 = time.perf_counter()
        store.ping()
        return Check("store", True, f"{store.url} answers ({(time.perf_counter() - t0) * 1e3:.1f} ms)")
    except StoreUnavailable as e:
        return Check("store", False, f"{store.url}: {e}")
    finally:
        store.close()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the milter closed the connection")
        data += chunk
    return data


def milter_handshake(family: int, address: Any, timeout: float) -> int:
    """Connect, negotiate options as an MTA does, quit; return the milter's protocol version."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        body = b"O" + struct.pack("!III", MILTER_VERSION, _ALL_ACTIONS, _ALL_PROTOCOL)
        s.sendall(struct.pack("!I", len(body)) + body)
        (length,) = struct.unpack("!I", _recv_exact(s, 4))
        if not 1 <= length <= 65536:
            raise ConnectionError(f"not a milter reply (length {length})")
        reply = _recv_exact(s, length)
        if reply[:1] != b"O" or len(reply) < 13:
            raise ConnectionError(f"not a milter option negotiation reply ({reply[:1]!r})")
        s.sendall(struct.pack("!I", 1) + b"Q")
        version: int = struct.unpack("!I", reply[1:5])[0]
        return version


def check_milter(loaded: LoadedConfig, timeout: float) -> Check:
    """The milter socket accepts a connection and answers option negotiation."""
    listen = loaded.config.milter.listen
    kind, host, port, path = parse_listen(listen)
    family: int
    address: Any
    if kind == "unix":
        family, address = socket.AF_UNIX, path
    else:
        family = socket.AF_INET6 if kind == "inet6" or (host and ":" in host) else socket.AF_INET
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host or "", host)  # listening on all: ask loopback
        address = (host, port)
    try:
        version = milter_handshake(family, address, timeout)
    except (OSError, struct.error) as e:
        return Check("milter", False, f"{listen}: {getattr(e, 'strerror', None) or e}")
    return Check("milter", True, f"{listen} answers (milter protocol version {version})")


def check_metrics(loaded: LoadedConfig, timeout: float) -> Check | None:
    """GET /metrics answers 200 (None when metrics are off)."""
    address = loaded.config.metrics.address
    if address is None:
        return None
    host, port = address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # listening on all: ask loopback
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - http only, from the config
            status = r.status
    except (urllib.error.URLError, OSError) as e:
        return Check("metrics", False, f"{url}: {getattr(e, 'reason', None) or e}")
    return Check("metrics", status == 200, f"{url} answers {status}")


def run_checks(loaded: LoadedConfig, timeout: float = 5.0) -> list[Check]:
    """Every check, in order: daemon, store, milter, metrics (when configured)."""
    checks = [check_daemon(loaded, timeout), check_store(loaded, timeout), check_milter(loaded, timeout)]
    metrics = check_metrics(loaded, timeout)
    if metrics is not None:
        checks.append(metrics)
    return checks
