"""A throwaway PostgreSQL server on 127.0.0.1 for the tests (Debian's postgresql package).

Usage::

    with PostgresServer(tmp_path) as pg:
        pg.execute("CREATE TABLE t (k text, v text)")
        pg.execute("INSERT INTO t VALUES (%s, %s)", ("a", "b"))
        pg.execute("SELECT v FROM t")          # -> [("b",)]
        pg.url                                 # postgresql+psycopg://mj:PASSWORD@127.0.0.1:PORT/mail

Debian's own cluster, running or not, is never used; the binaries come from
the highest ``/usr/lib/postgresql/<version>/bin``. PostgreSQL refuses to run as
root, so ``initdb`` and ``postgres`` run as the ``postgres`` system user (with
its own groups). The cluster (``data/``, and ``sock/`` for the unix socket) is
therefore *not* under ``base``: it lives in a private ``/tmp/mjfilter-pg-*``
directory owned by ``postgres`` (:attr:`PostgresServer.cluster_dir`). Making a
pytest ``tmp_path`` traversable is not enough: every new pytest session (say a
second one running at the same time) chmods ``/tmp/pytest-of-root`` back to
0700, and a postgres process could then no longer reach its files. ``base``
only holds ``postgres.log``, written by the test process.
The superuser is ``mj`` with a random password (scram-sha-256 for every
connection); the database ``mail`` is created, owned by ``mj``. Durability is
off (``fsync``, ``synchronous_commit``, ``full_page_writes``): test data only.

``stop()`` does a *fast* shutdown (SIGINT: open sessions are disconnected;
SIGTERM would wait for every client to go), then an immediate one (SIGQUIT),
then SIGKILLs the server's own process group (a clean shutdown
leaves no backend behind: the postmaster exits after its children). Every wait has a
deadline. ``destroy()`` (and leaving the ``with`` block) stops the server and
removes the cluster directory; ``stop()`` keeps it, so ``start()`` brings the
same data back (on the same port). An ``atexit`` hook destroys any server a
test left behind.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from rig import LOOPBACK, free_port, stop_server

USER = "mj"
DATABASE = "mail"
_POLL = 0.05

_LIVE: set[PostgresServer] = set()  # strong references: a forgotten server is still destroyed at exit


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_LIVE):
        try:
            server.destroy()
        except Exception as e:  # noqa: BLE001 - best effort at exit
            print(f"pg_rig: could not stop PostgreSQL under {server.base}: {e}", file=sys.stderr)


def postgres_bin_dir() -> Path | None:
    """The highest-versioned ``/usr/lib/postgresql/<ver>/bin`` with initdb and postgres, or None."""
    found: list[tuple[tuple[int, ...], Path]] = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        ver = d.parent.name
        if re.fullmatch(r"\d+(\.\d+)*", ver) and (d / "initdb").is_file() and (d / "postgres").is_file():
            found.append((tuple(int(x) for x in ver.split(".")), d))
    return max(found)[1] if found else None


def _as_postgres_user() -> dict[str, Any]:
    """Popen arguments that drop to user postgres with *its* groups (``user=`` alone keeps root's gid 0)."""
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist("postgres", pw.pw_gid)}


class PostgresServer:
    """A private PostgreSQL cluster under ``base``, listening on 127.0.0.1:``port`` only.

    ``base`` (created if missing) receives ``postgres.log``. ``port`` is chosen free
    unless given; ``password`` (of the superuser ``mj``) is random unless given.
    Attributes: ``user``, ``password``, ``database``, ``port``, ``base``, ``log_path``,
    ``cluster_dir`` (None before the first start); :attr:`url`, :meth:`conninfo`.
    """

    def __init__(self, base: Path, port: int | None = None, password: str | None = None) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("PostgresServer must run as root (it runs PostgreSQL as user postgres)")
        bindir = postgres_bin_dir()
        if bindir is None:
            raise RuntimeError(
                "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: "
                "run make test, which installs postgresql"
            )
        self.bindir = bindir
        self.base = Path(base).resolve()
        self.log_path = self.base / "postgres.log"
        self.cluster_dir: Path | None = None
        self.port = port or free_port()
        self.user = USER
        self.password = password or secrets.token_urlsafe(18)
        self.database = DATABASE
        self.proc: subprocess.Popen[bytes] | None = None

    # -- addresses
    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``mail`` database (psycopg 3 driver)."""
        return f"postgresql+psycopg://{self.user}:{self.password}@{LOOPBACK}:{self.port}/{self.database}"

    def conninfo(self, dbname: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``psycopg.connect``."""
        return {"host": LOOPBACK, "port": self.port, "user": self.user, "password": self.password,
                "dbname": dbname or self.database, "connect_timeout": 5}

    # -- lifecycle
    def _as_postgres(self, argv: list[str], timeout: float) -> None:
        cp = subprocess.run(argv, **_as_postgres_user(), cwd=self.cluster_dir, env=self._env(), capture_output=True,
                            text=True, timeout=timeout, check=False)
        if cp.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {cp.returncode}\nstdout: {cp.stdout}\nstderr: {cp.stderr}")

    @staticmethod
    def _env() -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}

    @property
    def data_dir(self) -> Path:
        assert self.cluster_dir is not None, "not started yet"
        return self.cluster_dir / "data"

    @property
    def sock_dir(self) -> Path:
        assert self.cluster_dir is not None, "not started yet"
        return self.cluster_dir / "sock"

    def _initdb(self) -> None:
        # /tmp is world-searchable; the directory itself is postgres's, 0700.
        self.cluster_dir = Path(tempfile.mkdtemp(prefix="mjfilter-pg-", dir="/tmp"))
        shutil.chown(self.cluster_dir, "postgres", "postgres")
        for d in (self.data_dir, self.sock_dir):
            d.mkdir(mode=0o700)
            shutil.chown(d, "postgres", "postgres")
        pwfile = self.cluster_dir / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        shutil.chown(pwfile, "postgres", "postgres")
        try:
            self._as_postgres(
                [str(self.bindir / "initdb"), "-D", str(self.data_dir), f"--username={self.user}",
                 f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C",
                 "--no-sync", "--no-instructions"],
                timeout=120)
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self, timeout: float = 30.0) -> Self:
        """initdb (first time), start ``postgres``, wait until it accepts logins, create ``mail``."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.base.mkdir(parents=True, exist_ok=True)
        _LIVE.add(self)
        if self.cluster_dir is None or not (self.data_dir / "PG_VERSION").exists():
            if self.cluster_dir is not None:  # an initdb that failed half-way
                shutil.rmtree(self.cluster_dir, ignore_errors=True)
            self._initdb()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-h", LOOPBACK, "-p", str(self.port),
                 "-k", str(self.sock_dir), "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=50", "-c", "shared_buffers=16MB",
                 "-c", "logging_collector=off"],
                **_as_postgres_user(), cwd=self.cluster_dir, env=self._env(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True)
        try:
            self._wait_ready(timeout)
            if not self.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,), dbname="postgres"):
                self.execute(f'CREATE DATABASE "{self.database}" OWNER "{self.user}"', dbname="postgres")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode} at start\nlog tail:\n{self.log_tail()}")
            try:
                info = self.conninfo("postgres")
                info["connect_timeout"] = max(2, min(5, int(deadline - time.monotonic())))
                with psycopg.connect(**info):
                    return
            except psycopg.OperationalError as e:  # refused, or "the database system is starting up"
                last = e
            if time.monotonic() >= deadline:
                raise TimeoutError(f"PostgreSQL on {LOOPBACK}:{self.port} not ready after {timeout:g}s "
                                   f"(last: {last})\nlog tail:\n{self.log_tail()}")
            time.sleep(_POLL)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown; immediate after half of ``timeout``; then SIGKILL to the server's process group."""
        proc, self.proc = self.proc, None
        if proc is not None:
            # SIGINT: "fast" shutdown (SIGTERM would wait for pooled clients); SIGQUIT: immediate.
            stop_server(proc, "postgres", [(signal.SIGINT, timeout / 2), (signal.SIGQUIT, timeout / 2)])

    def destroy(self) -> None:
        """Stop the server and remove its cluster directory (the log under ``base`` stays)."""
        try:
            self.stop()
        finally:
            cluster, self.cluster_dir = self.cluster_dir, None
            _LIVE.discard(self)
            if cluster is not None:
                shutil.rmtree(cluster, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- helpers
    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None,
                dbname: str | None = None) -> list[tuple[Any, ...]] | None:
        """Run one statement as ``mj`` in ``mail`` (autocommit); rows for a query, else None."""
        import psycopg

        with psycopg.connect(**self.conninfo(dbname), autocommit=True) as conn:
            cur = conn.execute(sql, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description is not None else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
