"""A throwaway redis-server on 127.0.0.1 for the tests (Debian's redis-server package)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from rig import free_port, stop_server, wait_port


def redis_server_path() -> str | None:
    return shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


class RedisServer:
    """``redis-server`` on loopback, no persistence, in ``base``; stop() ends it."""

    def __init__(self, base: Path, port: int | None = None) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        exe = redis_server_path()
        if exe is None:
            raise RuntimeError("redis-server is not installed: run make test, which installs it")
        log = open(self.base / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.base), "--daemonize", "no", "--protected-mode", "yes"],
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        try:
            wait_port("127.0.0.1", self.port, timeout=15)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            stop_server(proc, "redis-server")

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
