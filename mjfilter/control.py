"""The control socket: ``mjfilter reload`` and ``mjfilter status`` talk to a running daemon.

libmilter takes SIGHUP to mean "stop", so reload cannot be a signal inside the
milter process. The daemon listens on a unix socket (mode 0600, root only by
default); one line in (``reload`` or ``status``), one JSON line out.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any

from . import __version__
from .config import ConfigError

log = logging.getLogger(__name__)


class _Handler(socketserver.StreamRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        line = self.rfile.readline(256).decode("ascii", "replace").strip()
        reply = self.server.control.command(line)
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    control: "ControlServer"


class ControlServer:
    def __init__(self, app: Any, path: Path) -> None:
        self.app = app
        self.path = Path(path)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def command(self, line: str) -> dict[str, Any]:
        if line == "reload":
            with self._lock:
                try:
                    msg = self.app.reload()
                except ConfigError as e:
                    log.error("reload refused, the running configuration stays:\n%s", e)
                    return {"ok": False, "error": str(e)}
                except Exception as e:
                    log.exception("reload failed, the running configuration stays")
                    return {"ok": False, "error": f"{type(e).__name__}: {e}"}
            log.info("%s", msg)
            return {"ok": True, "message": msg}
        if line == "status":
            rt = self.app.runtime
            return {"ok": True, "pid": os.getpid(), "version": __version__, "config": str(self.app.config_path),
                    "generation": rt.generation, "steps": [s.name for s in rt.chain.steps],
                    "in_flight": self.app.in_flight, "draining": self.app.draining}
        return {"ok": False, "error": f"unknown command {line!r} (try: reload, status)"}

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if _alive(self.path):
                raise RuntimeError(f"another mjfilter answers on {self.path}")
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = _Server(str(self.path), _Handler)
        finally:
            os.umask(old)
        self._server.control = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="mjfilter-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def _alive(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(path))
        return True
    except OSError:
        return False


def send_command(path: Path, command: str, timeout: float = 60.0) -> dict[str, Any]:
    """Send one command to a running daemon; raise ``OSError`` when none listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data.decode() or "{}")
