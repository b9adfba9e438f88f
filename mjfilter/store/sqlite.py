"""The embedded SQLite store: one file, WAL, a busy timeout, one connection per thread."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from . import StoreUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated REAL NOT NULL DEFAULT (julianday('now'))
);
"""


class SQLiteStore:
    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._conn() as db:
                db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise StoreUnavailable(f"cannot open {self.path}: {e}") from e

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite {self.path}: {e}") from e

    def ping(self) -> None:
        self._run("SELECT 1")

    def get(self, key: str) -> str | None:
        rows = self._run("SELECT value FROM kv WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def put(self, key: str, value: str) -> None:
        self._run("INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value,"
                  " updated = julianday('now')", (key, value))

    def put_if_absent(self, key: str, value: str) -> str:
        self._run("INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO NOTHING", (key, value))
        kept = self.get(key)
        assert kept is not None
        return kept

    def check(self) -> dict[str, object]:
        result = self._run("PRAGMA integrity_check")
        keys = self._run("SELECT count(*) FROM kv")[0][0]
        size = self.path.stat().st_size if self.path.exists() else 0
        return {"backend": "sqlite", "path": str(self.path), "integrity": str(result[0][0]),
                "keys": keys, "bytes": size}

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                try:
                    db.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()
