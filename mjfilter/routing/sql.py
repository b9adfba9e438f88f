"""Sender-dependent relay hosts read from an SQL table.

iRedMail keeps Postfix's ``sender_dependent_relayhost_maps`` in SQL, in a table
shaped like::

    CREATE TABLE sender_relayhost (
        account   VARCHAR(255) NOT NULL,  -- "user@domain" or "@domain"
        relayhost VARCHAR(255) NOT NULL   -- "[host]:port"
    );

:class:`SqlSource` answers one key at a time with :data:`DEFAULT_QUERY`, which
reads exactly that table. Other schemas work by giving another query: any
``SELECT`` whose first column of the first row is the relay host, with the bind
parameter ``:account`` standing for the key, e.g.::

    SELECT transport FROM relay_map WHERE sender = :account AND active = 1

The key is used exactly as given (callers pass it lowercased already, once as
``user@domain`` and once as ``@domain``); the order of the two look-ups, and
what a hit means, is the caller's business.

Databases, through SQLAlchemy 2 (the ``sql`` extra: ``pip install 'mjfilter[sql]'``):

- ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``
- ``postgresql+psycopg://user:pass@host:port/db`` (``postgresql://`` and
  ``postgres://`` mean the same: the psycopg 3 driver)
- ``mysql+pymysql://user:pass@host:port/db`` and ``mariadb+pymysql://...``
  (``mysql://`` and ``mariadb://`` mean PyMySQL)

Nothing connects when the source is created: the engine and its connection pool
are built at once (which checks the URL and that the driver is installed), the
first connection is made by the first :meth:`SqlSource.lookup`. Pooled
connections are checked before use (``pool_pre_ping``), so a restarted database
costs no failed look-up. ``timeout`` bounds connecting (for PostgreSQL at least
2 s: libpq's minimum), waiting for a free pooled connection and, on PostgreSQL,
each statement (``statement_timeout``); on MySQL/MariaDB it is also the socket
read/write timeout; on SQLite it is how long a locked database is waited for.

Whenever the database cannot answer (down, timed out, authentication refused,
a query naming a missing table or column) :meth:`SqlSource.lookup` raises
:class:`SqlUnavailable`, whose message says why and never holds the password.
A :class:`SqlSource` is safe to use from several threads at once.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from mjfilter.store import mask_url

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.engine import URL, Engine
    from sqlalchemy.sql.elements import TextClause

__all__ = ["DEFAULT_QUERY", "SqlSource", "SqlUnavailable"]

DEFAULT_QUERY = "SELECT relayhost FROM sender_relayhost WHERE account = :account"

# The bind parameter ``:account`` as SQLAlchemy's text() finds it: not part of a
# ``::cast``, not escaped with a backslash, not the tail of a longer name.
_ACCOUNT_PARAM = re.compile(r"(?<![:\w\\]):account(?![:\w])")

# Scheme (driver name) as written -> the SQLAlchemy driver name used.
_DRIVERS = {
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite+pysqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mysql+pymysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
    "mariadb+pymysql": "mariadb+pymysql",
}

_MAX_REASON = 500  # characters of a driver's error message kept in SqlUnavailable


class SqlUnavailable(Exception):
    """The database could not answer a look-up (down, timeout, authentication, bad query)."""


class SqlSource:
    """Look keys up in an SQL table: the first column of the first row, or None."""

    def __init__(self, url: str, query: str = DEFAULT_QUERY, timeout: float = 5.0) -> None:
        if not isinstance(query, str) or not _ACCOUNT_PARAM.search(query):
            raise ValueError(
                f"SQL relay query must use the bind parameter :account for the key "
                f"(e.g. {DEFAULT_QUERY!r}), got {query!r}"
            )
        if not timeout > 0:
            raise ValueError(f"SQL timeout must be a positive number of seconds, got {timeout!r}")
        self._url = url  # holds the password: never log it, use describe()
        self.query = query
        self.timeout = float(timeout)
        self._described = "sql:" + mask_url(url)
        try:
            import sqlalchemy
        except ImportError as e:  # pragma: no cover - the extra is part of the test install
            raise ImportError(
                "the SQL relay-map source needs SQLAlchemy and a driver: pip install 'mjfilter[sql]'"
            ) from e
        self._sa = sqlalchemy
        sa_url = self._parse(url)
        self._password = sa_url.password if isinstance(sa_url.password, str) else None
        self._statement: TextClause = sqlalchemy.text(query)
        self._engine: Engine = self._create_engine(sa_url)

    # -- construction ------------------------------------------------------------

    def _parse(self, url: str) -> URL:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            sa_url = make_url(url)
        except (ArgumentError, ValueError) as e:
            raise ValueError(f"SQL relay-map URL {mask_url(url)} cannot be parsed: {e.__class__.__name__}") from None
        driver = _DRIVERS.get(sa_url.drivername)
        if driver is None:
            raise ValueError(
                f"SQL relay-map URL {mask_url(url)}: unsupported database {sa_url.drivername!r} "
                f"(use sqlite:///, postgresql://, postgresql+psycopg://, mysql+pymysql:// or mariadb+pymysql://)"
            )
        if driver.startswith("sqlite") and not sa_url.database:
            raise ValueError(f"SQL relay-map URL {mask_url(url)}: give a database file, sqlite:///PATH")
        return sa_url.set(drivername=driver)

    def _connect_args(self, sa_url: URL) -> dict[str, Any]:
        """Per-driver timeouts; a parameter already in the URL's query string wins."""
        backend = sa_url.get_backend_name()
        given = set(sa_url.query)
        args: dict[str, Any] = {}
        if backend == "postgresql":
            args["connect_timeout"] = max(2, math.ceil(self.timeout))  # libpq: whole seconds, 2 at least
            args["options"] = f"-c statement_timeout={max(1, round(self.timeout * 1000))}"
        elif backend in ("mysql", "mariadb"):
            secs = max(1, math.ceil(self.timeout))
            args.update(connect_timeout=secs, read_timeout=secs, write_timeout=secs)
        elif backend == "sqlite":
            args.update(timeout=self.timeout, check_same_thread=False)
        return {k: v for k, v in args.items() if k not in given}

    def _create_engine(self, sa_url: URL) -> Engine:
        sa = self._sa
        kwargs: dict[str, Any] = {"pool_pre_ping": True, "connect_args": self._connect_args(sa_url)}
        if sa_url.get_backend_name() != "sqlite":
            # Network databases: a bounded wait for a pooled connection, and no connection
            # kept longer than 30 minutes (firewalls and proxies drop idle ones).
            kwargs.update(pool_timeout=self.timeout, pool_recycle=1800)
        try:
            return sa.create_engine(sa_url, **kwargs)
        except ImportError as e:
            raise ImportError(
                f"SQL relay-map URL {self.describe()}: the database driver is missing ({e}): "
                f"pip install 'mjfilter[sql]'"
            ) from e
        except sa.exc.ArgumentError as e:
            raise ValueError(f"SQL relay-map URL {self.describe()}: {self._scrub(str(e))}") from None

    # -- use ---------------------------------------------------------------------

    def lookup(self, key: str) -> str | None:
        """The relay host for ``key`` (used as given), stripped; None when there is no row or it is NULL/empty.

        Raises :class:`SqlUnavailable` when the database cannot answer.
        """
        sa = self._sa
        try:
            with self._engine.connect() as conn:
                row = conn.execute(self._statement, {"account": key}).first()
        except (sa.exc.SQLAlchemyError, OSError) as e:
            raise SqlUnavailable(f"{self._described}: {self._reason(e)}") from None
        if row is None or not len(row):
            return None
        value = row[0]
        if value is None:
            return None
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value).decode("utf-8", "replace")
        value = str(value).strip()
        return value or None

    def describe(self) -> str:
        """``sql:`` and the URL with its password masked."""
        return self._described

    def close(self) -> None:
        """Close the pooled connections (idempotent). A later lookup would open new ones."""
        self._engine.dispose()

    def __repr__(self) -> str:
        return f"SqlSource({self._described!r})"

    # -- errors ------------------------------------------------------------------

    def _reason(self, e: BaseException) -> str:
        """Why a look-up failed, in one line, without the SQL parameters or the password."""
        sa = self._sa
        if isinstance(e, sa.exc.DBAPIError) and e.orig is not None:
            cause: BaseException = e.orig
            if isinstance(e, sa.exc.OperationalError):
                kind = "cannot connect or query"
            elif isinstance(e, sa.exc.ProgrammingError):
                kind = "query failed"
            else:
                kind = "database error"
        else:
            cause, kind = e, "unavailable"
        lines = [line.strip() for line in str(cause).splitlines()]
        # PostgreSQL's "LINE 1: <statement>" and "^" position marker add nothing in one line.
        text = " / ".join(x for x in lines if x and not x.startswith("LINE ") and x.strip("^ "))
        if isinstance(e, sa.exc.TimeoutError):
            text = f"no free pooled connection within {self.timeout:g}s"
        text = self._scrub(text) or cause.__class__.__name__
        if len(text) > _MAX_REASON:
            text = text[: _MAX_REASON - 3] + "..."
        return f"{kind}: {cause.__class__.__name__}: {text}"

    def _scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text
