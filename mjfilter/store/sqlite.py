"""The embedded SQLite store: one file, WAL, a busy timeout, one connection per thread.

Writes that must be atomic (reservations) run in ``BEGIN IMMEDIATE``
transactions: SQLite then serialises writers across threads and processes on
the same host, and a writer that cannot get the lock within ``timeout``
seconds gets ``StoreUnavailable`` (the message gets 451, the client retries).
"""

from __future__ import annotations

import json
import queue
import sqlite3
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

from . import CLAIMED, HELD, TAKEN, CampaignStats, StoreUnavailable, SuppressionEntry, lookup_keys

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    key TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires REAL  -- NULL: never
);
CREATE TABLE IF NOT EXISTS suppression (
    list TEXT NOT NULL,
    entry TEXT NOT NULL,
    code INTEGER,
    reason TEXT,
    added REAL NOT NULL,
    PRIMARY KEY (list, entry)
);
CREATE TABLE IF NOT EXISTS bounces (
    address TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    last REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS campaigns (
    tenant TEXT NOT NULL,
    campaign TEXT NOT NULL,
    messages INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    blocked INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (tenant, campaign)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    data TEXT NOT NULL
);
"""


class SQLiteStore:
    """SQLite behind a small pool of connections.

    Not thread-local connections: libmilter runs every MTA connection on a
    thread of its own, so a connection per thread would be a connection per
    message, never closed. A connection is taken from the pool for one
    operation and given back; at most ``POOL_SIZE`` idle ones are kept.
    """

    POOL_SIZE = 8

    def __init__(self, path: Path, timeout: float = 5.0, keep_events: int = 100000) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.timeout = timeout
        self.keep_events = keep_events
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._conn() as db:
                db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise StoreUnavailable(f"cannot open {self.path}: {e}") from e

    # -- plumbing -------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        """A connection for one operation, back to the pool afterwards."""
        try:
            db = self._idle.get_nowait()
        except queue.Empty:
            try:
                db = self._connect()
            except sqlite3.Error as e:
                raise StoreUnavailable(f"sqlite {self.path}: {e}") from e
        try:
            yield db
        finally:
            if self._closed or db.in_transaction or self._idle.qsize() >= self.POOL_SIZE:
                db.close()
            else:
                self._idle.put(db)

    def _run(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._conn() as db:
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StoreUnavailable(f"sqlite {self.path}: {e}") from e

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; any SQLite error -> ``StoreUnavailable``."""
        with self._conn() as db:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StoreUnavailable(f"sqlite {self.path}: {e}") from e
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as e:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(e, sqlite3.Error):
                    raise StoreUnavailable(f"sqlite {self.path}: {e}") from e
                raise

    # -- key/value -------------------------------------------------------------
    def ping(self) -> None:
        self._run("SELECT 1")

    def get(self, key: str) -> str | None:
        rows = self._run("SELECT value FROM kv WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def put(self, key: str, value: str) -> None:
        self._run("INSERT INTO kv(key, value, updated) VALUES(?, ?, ?) ON CONFLICT(key) DO UPDATE SET"
                  " value = excluded.value, updated = excluded.updated", (key, value, time.time()))

    def put_if_absent(self, key: str, value: str) -> str:
        with self._write() as db:
            db.execute("INSERT INTO kv(key, value, updated) VALUES(?, ?, ?) ON CONFLICT(key) DO NOTHING",
                       (key, value, time.time()))
            return str(db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()[0])

    # -- reservations ----------------------------------------------------------------
    def reserve(self, keys: Sequence[str], holder: str, ttl: float | None = None) -> list[int]:
        if not keys:
            return []
        now = time.time()
        expires = None if ttl is None else now + ttl
        out: list[int] = []
        with self._write() as db:
            for key in keys:
                row = db.execute("SELECT holder, expires FROM reservations WHERE key = ?", (key,)).fetchone()
                if row is None or (row[1] is not None and row[1] <= now):
                    db.execute("INSERT OR REPLACE INTO reservations(key, holder, expires) VALUES(?, ?, ?)",
                               (key, holder, expires))
                    out.append(CLAIMED)
                else:
                    out.append(HELD if row[0] == holder else TAKEN)
        return out

    def release(self, keys: Sequence[str], holder: str) -> int:
        if not keys:
            return 0
        with self._write() as db:
            return sum(db.execute("DELETE FROM reservations WHERE key = ? AND holder = ?", (k, holder)).rowcount
                       for k in keys)

    def holder(self, key: str) -> str | None:
        rows = self._run("SELECT holder FROM reservations WHERE key = ? AND (expires IS NULL OR expires > ?)",
                         (key, time.time()))
        return str(rows[0][0]) if rows else None

    # -- suppression ------------------------------------------------------------------
    def suppress_add(self, entries: Iterable[SuppressionEntry]) -> int:
        rows = [(e.list, e.entry, e.code, e.reason, e.added) for e in entries]
        with self._write() as db:
            db.executemany("INSERT OR REPLACE INTO suppression(list, entry, code, reason, added)"
                           " VALUES(?, ?, ?, ?, ?)", rows)
        return len(rows)

    def suppress_remove(self, list_name: str, entry: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM suppression WHERE list = ? AND entry = ?", (list_name, entry)).rowcount > 0

    def suppressed(self, list_name: str, addresses: Sequence[str]) -> dict[str, SuppressionEntry]:
        if not addresses:
            return {}
        wanted = {a: lookup_keys(a) for a in addresses}
        keys = sorted({k for pair in wanted.values() for k in pair})
        marks = ",".join("?" * len(keys))
        rows = self._run(f"SELECT entry, code, reason, added FROM suppression WHERE list = ? AND entry IN ({marks})",
                         (list_name, *keys))
        found = {r[0]: SuppressionEntry(list_name, r[0], r[1], r[2], r[3]) for r in rows}
        out = {}
        for address, (exact, domain) in wanted.items():
            hit = found.get(exact) or found.get(domain)
            if hit is not None:
                out[address] = hit
        return out

    def suppress_entries(self, list_name: str | None = None) -> list[SuppressionEntry]:
        if list_name is None:
            rows = self._run("SELECT list, entry, code, reason, added FROM suppression ORDER BY list, entry")
        else:
            rows = self._run("SELECT list, entry, code, reason, added FROM suppression WHERE list = ?"
                             " ORDER BY entry", (list_name,))
        return [SuppressionEntry(*r) for r in rows]

    def record_bounce(self, address: str) -> int:
        with self._write() as db:
            db.execute("INSERT INTO bounces(address, count, last) VALUES(?, 1, ?) ON CONFLICT(address)"
                       " DO UPDATE SET count = count + 1, last = excluded.last", (address.lower(), time.time()))
            return int(db.execute("SELECT count FROM bounces WHERE address = ?", (address.lower(),)).fetchone()[0])

    # -- campaigns and events --------------------------------------------------------------
    def campaign_add(self, tenant: str, campaign: str, messages: int = 0, delivered: int = 0,
                     blocked: int = 0) -> None:
        now = time.time()
        with self._write() as db:
            db.execute(
                "INSERT INTO campaigns(tenant, campaign, messages, delivered, blocked, first_seen, last_seen)"
                " VALUES(?, ?, ?, ?, ?, ?, ?) ON CONFLICT(tenant, campaign) DO UPDATE SET"
                " messages = messages + excluded.messages, delivered = delivered + excluded.delivered,"
                " blocked = blocked + excluded.blocked, last_seen = excluded.last_seen",
                (tenant, campaign, messages, delivered, blocked, now, now))

    def campaigns(self) -> list[CampaignStats]:
        rows = self._run("SELECT tenant, campaign, messages, delivered, blocked, first_seen, last_seen"
                         " FROM campaigns ORDER BY last_seen DESC")
        return [CampaignStats(*r) for r in rows]

    def add_events(self, events: Sequence[dict[str, Any]]) -> None:
        if not events:
            return
        with self._write() as db:
            db.executemany("INSERT INTO events(data) VALUES(?)", [(json.dumps(e),) for e in events])
            if self.keep_events:
                db.execute("DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - ?", (self.keep_events,))

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._run("SELECT data FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [json.loads(r[0]) for r in reversed(rows)]

    # -- maintenance -------------------------------------------------------------------
    def check(self) -> dict[str, object]:
        integrity = str(self._run("PRAGMA integrity_check")[0][0])
        counts = {t: self._run(f"SELECT count(*) FROM {t}")[0][0]  # noqa: S608 - fixed table names
                  for t in ("kv", "reservations", "suppression", "bounces", "campaigns", "events")}
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return {"ok": integrity == "ok", "backend": "sqlite", "path": str(self.path), "integrity": integrity,
                "rows": counts, "bytes": size}

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
