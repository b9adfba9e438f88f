"""SqlSource (mjfilter/routing/sql.py) against a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lookups import assert_concurrent_lookups
from pg_rig import PostgresServer
from rig import LOOPBACK, free_port

from mjfilter.routing.sql import DEFAULT_QUERY, SqlSource, SqlUnavailable

IREDMAIL_TABLE = "CREATE TABLE sender_relayhost (account VARCHAR(255) NOT NULL, relayhost VARCHAR(255))"
ROWS = [
    ("alice@a.example", "[relay-alice.example]:587"),
    ("@a.example", "[relay-a.example]:25"),
    ("@b.example", "[10.0.0.2]:2525"),
    ("null@a.example", None),
    ("empty@a.example", ""),
    ("blank@a.example", "   "),
    ("padded@a.example", "  [padded.example]:25 \n"),
]


@dataclass
class Db:
    """One database to test against: its URL and a way to run setup SQL (``?`` placeholders)."""

    kind: str
    url: str
    password: str | None
    _sqlite_path: Path | None = None
    _pg: PostgresServer | None = None

    def run(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        if self._sqlite_path is not None:
            with sqlite3.connect(self._sqlite_path) as conn:
                conn.execute(sql, params)
            conn.close()
        else:
            assert self._pg is not None
            self._pg.execute(sql.replace("?", "%s"), params)

    def fill(self, rows: Sequence[tuple[str, str | None]] = ROWS) -> None:
        self.run(IREDMAIL_TABLE)
        for row in rows:
            self.run("INSERT INTO sender_relayhost (account, relayhost) VALUES (?, ?)", row)


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    if request.param == "sqlite":
        path = tmp_path / "relay.db"
        yield Db("sqlite", f"sqlite:///{path}", None, _sqlite_path=path)
    else:
        server: PostgresServer = request.getfixturevalue("pg")
        server.execute("DROP TABLE IF EXISTS sender_relayhost, relay_map")
        yield Db("postgresql", server.url, server.password, _pg=server)


@pytest.fixture
def sources() -> Iterator[list[SqlSource]]:
    """SqlSources to close after the test (append them)."""
    made: list[SqlSource] = []
    yield made
    for s in made:
        s.close()


def source(sources: list[SqlSource], *args: Any, **kwargs: Any) -> SqlSource:
    s = SqlSource(*args, **kwargs)
    sources.append(s)
    return s


# --------------------------------------------------------------------------- both databases


def test_user_and_domain_hits(db: Db, sources: list[SqlSource]) -> None:
    db.fill()
    s = source(sources, db.url)
    assert s.lookup("alice@a.example") == "[relay-alice.example]:587"
    assert s.lookup("@a.example") == "[relay-a.example]:25"
    assert s.lookup("@b.example") == "[10.0.0.2]:2525"


def test_miss_null_empty_and_stripped(db: Db, sources: list[SqlSource]) -> None:
    db.fill()
    s = source(sources, db.url)
    assert s.lookup("bob@a.example") is None  # only the domain row would match: not this source's business
    assert s.lookup("@c.example") is None
    assert s.lookup("") is None
    assert s.lookup("null@a.example") is None
    assert s.lookup("empty@a.example") is None
    assert s.lookup("blank@a.example") is None
    assert s.lookup("padded@a.example") == "[padded.example]:25"


def test_key_used_as_given(db: Db, sources: list[SqlSource]) -> None:
    db.fill()
    s = source(sources, db.url)
    assert s.lookup("Alice@A.example") is None
    assert s.lookup("alice@a.example ") is None
    assert s.lookup("x' OR '1'='1") is None  # a bound parameter, never SQL


def test_custom_query(db: Db, sources: list[SqlSource]) -> None:
    db.run("CREATE TABLE relay_map (sender TEXT, transport TEXT, active INTEGER, prio INTEGER)")
    for row in [("carol@d.example", "[old.example]:25", 1, 1),
                ("carol@d.example", "[new.example]:587", 1, 2),
                ("carol@d.example", "[off.example]:25", 0, 9),
                ("dave@d.example", "[off.example]:25", 0, 1)]:
        db.run("INSERT INTO relay_map VALUES (?, ?, ?, ?)", row)
    q = "SELECT transport, sender FROM relay_map WHERE sender = :account AND active = 1 ORDER BY prio DESC"
    s = source(sources, db.url, query=q)
    assert s.lookup("carol@d.example") == "[new.example]:587"  # first row, first column
    assert s.lookup("dave@d.example") is None


def test_bad_query_is_unavailable(db: Db, sources: list[SqlSource]) -> None:
    s = source(sources, db.url, query="SELECT relayhost FROM no_such_table WHERE account = :account")
    with pytest.raises(SqlUnavailable, match="no_such_table") as ei:
        s.lookup("alice@a.example")
    if db.password:
        assert db.password not in str(ei.value)
    assert "alice@a.example" not in str(ei.value)  # SQL parameters are left out


def test_concurrent_lookups(db: Db, sources: list[SqlSource]) -> None:
    rows = [(f"u{i}@c.example", f"[relay{i}.example]:{1000 + i}") for i in range(40)]
    db.fill(rows)
    s = source(sources, db.url)
    expected = dict(rows) | {f"nobody{i}@c.example": None for i in range(10)}
    assert_concurrent_lookups(s.lookup, expected)


def test_close_is_idempotent(db: Db) -> None:
    db.fill()
    s = SqlSource(db.url)
    assert s.lookup("@b.example") == "[10.0.0.2]:2525"
    s.close()
    s.close()


# --------------------------------------------------------------------------- no database needed


@pytest.mark.parametrize("query", [
    "SELECT relayhost FROM sender_relayhost WHERE account = 'x'",
    "SELECT relayhost FROM sender_relayhost WHERE account = :accounts",
    "SELECT relayhost FROM sender_relayhost WHERE account = ?",
    "SELECT relayhost FROM sender_relayhost WHERE account = %(account)s",
    "SELECT 'a'::account",
    "",
])
def test_query_without_account_parameter(query: str) -> None:
    with pytest.raises(ValueError, match=":account"):
        SqlSource("sqlite:////nonexistent/x.db", query=query)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "oracle://u:p@h/db", "not a url", "sqlite://"])
def test_unsupported_url(url: str) -> None:
    with pytest.raises(ValueError) as ei:
        SqlSource(url)
    assert "p@h" not in str(ei.value)


def test_nothing_connects_at_creation(tmp_path: Path) -> None:
    path = tmp_path / "later.db"
    s = SqlSource(f"sqlite:///{path}")
    assert not path.exists()
    assert s.describe() == f"sql:sqlite:///{path}"
    s.close()


def test_default_query_is_iredmail() -> None:
    assert DEFAULT_QUERY == "SELECT relayhost FROM sender_relayhost WHERE account = :account"


def test_describe_masks_password() -> None:
    for url, want in [
        ("postgresql://mj:S3cret-pw@127.0.0.1:5433/mail", "sql:postgresql://mj:***@127.0.0.1:5433/mail"),
        ("postgresql+psycopg://mj:S3cret-pw@db/mail", "sql:postgresql+psycopg://mj:***@db/mail"),
        ("mysql+pymysql://mj:S3cret-pw@db:3306/vmail", "sql:mysql+pymysql://mj:***@db:3306/vmail"),
        ("mariadb+pymysql://mj:S3cret-pw@db/vmail", "sql:mariadb+pymysql://mj:***@db/vmail"),
    ]:
        s = SqlSource(url)
        assert s.describe() == want
        assert "S3cret-pw" not in repr(s)
        s.close()


# --------------------------------------------------------------------------- PostgreSQL failures


def test_postgresql_scheme_means_psycopg3(pg: PostgresServer, sources: list[SqlSource]) -> None:
    pg.execute("DROP TABLE IF EXISTS sender_relayhost")
    pg.execute(IREDMAIL_TABLE)
    pg.execute("INSERT INTO sender_relayhost VALUES ('@e.example', '[e.example]:25')")
    plain = pg.url.replace("postgresql+psycopg://", "postgresql://")
    s = source(sources, plain)
    assert s.lookup("@e.example") == "[e.example]:25"
    assert s.describe() == "sql:" + plain.replace(pg.password, "***")


def assert_fast_unavailable(s: SqlSource, budget: float, secret: str, match: str | None = None) -> SqlUnavailable:
    t0 = time.monotonic()
    with pytest.raises(SqlUnavailable, match=match) as ei:
        s.lookup("alice@a.example")
    elapsed = time.monotonic() - t0
    assert elapsed < budget, f"took {elapsed:.2f}s: {ei.value}"
    assert secret not in str(ei.value)
    assert "***" in str(ei.value)  # names the masked URL
    return ei.value


@pytest.mark.parametrize("scheme", ["postgresql+psycopg", "mysql+pymysql", "mariadb+pymysql"])
def test_nothing_listening(scheme: str, sources: list[SqlSource]) -> None:
    port = free_port()
    s = source(sources, f"{scheme}://mj:S3cret-pw@{LOOPBACK}:{port}/mail", timeout=5)
    assert_fast_unavailable(s, 2.0, "S3cret-pw")
    assert_fast_unavailable(s, 2.0, "S3cret-pw")  # and again: no stuck pool state


def test_hung_server_times_out(sources: list[SqlSource]) -> None:
    """A peer that accepts TCP but never speaks: the connect timeout (2 s, libpq's minimum) ends it."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(8)  # the kernel completes handshakes; nobody ever answers
        port = listener.getsockname()[1]
        s = source(sources, f"postgresql://mj:S3cret-pw@{LOOPBACK}:{port}/mail", timeout=2)
        assert_fast_unavailable(s, 2 + 1.5, "S3cret-pw")


def test_wrong_password(pg: PostgresServer, sources: list[SqlSource]) -> None:
    url = pg.url.replace(f":{pg.password}@", ":Wr0ng-pw@")
    s = source(sources, url)
    e = assert_fast_unavailable(s, 3.0, "Wr0ng-pw", match="(?i)authentication")
    assert pg.password not in str(e)


def test_statement_timeout(pg: PostgresServer, sources: list[SqlSource]) -> None:
    q = "SELECT CAST(pg_sleep(10) AS text) || :account"
    s = source(sources, pg.url, query=q, timeout=1)
    assert_fast_unavailable(s, 1 + 1.5, pg.password, match="(?i)statement timeout")


def test_server_stops_and_comes_back(tmp_path: Path, sources: list[SqlSource]) -> None:
    """A pooled connection to a server that went away: the pre-ping fails, the reconnect is refused
    at once; after a restart on the same port the source works again without being recreated."""
    server = PostgresServer(tmp_path / "pg")
    try:
        server.start()
        server.execute(IREDMAIL_TABLE)
        server.execute("INSERT INTO sender_relayhost VALUES ('alice@a.example', '[r.example]:25')")
        s = source(sources, server.url, timeout=5)
        assert s.lookup("alice@a.example") == "[r.example]:25"  # a connection now sits in the pool
        server.stop()
        assert not server.running()
        assert_fast_unavailable(s, 2.0, server.password)
        server.start()  # same cluster, same port
        assert s.lookup("alice@a.example") == "[r.example]:25"
    finally:
        server.destroy()
