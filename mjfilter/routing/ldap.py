"""Sender-dependent relay hosts read from an LDAP directory.

iRedMail with OpenLDAP keeps Postfix's ``sender_dependent_relayhost_maps`` in
the attribute ``senderRelayHost`` (a value like ``[smtp.example.com]:587``),
either on a user entry or on a domain entry::

    dn: mail=alice@a.example,ou=Users,domainName=a.example,o=domains,dc=example,dc=org
    objectClass: mailUser
    mail: alice@a.example
    senderRelayHost: [relay-alice.example]:587

    dn: domainName=a.example,o=domains,dc=example,dc=org
    objectClass: mailDomain
    domainName: a.example
    senderRelayHost: [relay-a.example]:25

:class:`LdapSource` answers one key at a time, like the SQL source
(:mod:`mjfilter.routing.sql`): a key ``user@domain`` is searched with
``user_filter`` (``{address}`` standing for the key), a key ``@domain`` with
``domain_filter`` (``{domain}`` standing for the domain, without the ``@``).
Both are searched in the whole subtree under ``base``, for one entry at most;
the answer is the first value of ``attribute`` of that entry, stripped, or None
(no entry, no such attribute, an empty value). The defaults read exactly
iRedMail's schema; other schemas work by giving other filters and another
attribute, e.g.::

    user_filter="(&(objectClass=inetOrgPerson)(|(mail={address})(mailAlternateAddress={address})))"
    attribute="mailRoutingAddress"

The value put in a filter is escaped (RFC 4515: ``* ( ) \\ NUL``), so a key can
never widen the search. The key is used as given (callers pass it lowercased
already, once as ``user@domain`` and once as ``@domain``); the order of the two
look-ups, and what a hit means, is the caller's business. LDAP compares
``mail`` and ``domainName`` without regard to case anyway.

The directory, through ldap3 (the ``ldap`` extra: ``pip install 'mjfilter[ldap]'``):
``ldap://host[:port]`` or ``ldaps://host[:port]`` (TLS from the first byte, the
server certificate checked against the system's CAs and the host name). With
``bind_dn`` and ``bind_password`` every connection does a simple bind as that
DN; without them it binds anonymously. Referrals are not followed.

Nothing connects when the source is created. Connections are made by
:meth:`LdapSource.lookup` as needed, one per concurrent look-up, and kept for
reuse (a few, for at most :data:`MAX_IDLE` seconds idle). A kept connection the
server closed meanwhile (it restarted, or dropped idle clients) costs no failed
look-up: the search is retried once on a new connection. ``timeout`` bounds
connecting, each reply (the bind, the search) and, on the server's side, the
search itself.

Whenever the directory cannot answer (down, timed out, bind refused, a search
error such as a missing base) :meth:`LdapSource.lookup` raises
:class:`LdapUnavailable`, whose message says why and never holds the password.
An :class:`LdapSource` is safe to use from several threads at once.
"""

from __future__ import annotations

import contextlib
import math
import re
import socket
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mjfilter.store import mask_url

if TYPE_CHECKING:  # pragma: no cover
    from ldap3 import Connection, Server

__all__ = ["DEFAULT_ATTRIBUTE", "DEFAULT_DOMAIN_FILTER", "DEFAULT_USER_FILTER", "MAX_IDLE", "LdapSource",
           "LdapUnavailable"]

DEFAULT_USER_FILTER = "(&(objectClass=mailUser)(mail={address}))"
DEFAULT_DOMAIN_FILTER = "(&(objectClass=mailDomain)(domainName={domain}))"
DEFAULT_ATTRIBUTE = "senderRelayHost"

MAX_IDLE = 300.0  # seconds a kept connection may sit unused before it is closed instead of reused
_MAX_KEPT = 8  # idle connections kept for reuse
_MAX_REASON = 500  # characters of an error message kept in LdapUnavailable

# An attribute description: a name or an OID, with options (";lang-en", ";binary").
_ATTRIBUTE = re.compile(r"(?:[A-Za-z][A-Za-z0-9-]*|\d+(?:\.\d+)+)(?:;[A-Za-z0-9-]+)*")

# LDAP result codes a search may end with and still have answered.
_SUCCESS = 0
_SIZE_LIMIT_EXCEEDED = 4


class LdapUnavailable(Exception):
    """The directory could not answer a look-up (down, timeout, bind refused, search error)."""


class _Broken(Exception):
    """The connection itself failed (socket error, closed by the server, timeout): not reusable."""

    def __init__(self, reason: str, timed_out: bool) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class LdapSource:
    """Look keys up in an LDAP directory: the first value of ``attribute`` of the entry found, or None."""

    def __init__(self, url: str, base: str, bind_dn: str | None = None, bind_password: str | None = None,
                 user_filter: str = DEFAULT_USER_FILTER,
                 domain_filter: str = DEFAULT_DOMAIN_FILTER,
                 attribute: str = DEFAULT_ATTRIBUTE, timeout: float = 5.0) -> None:
        try:
            with warnings.catch_warnings():
                # ldap3 2.9 imports names newer pyasn1 releases deprecate: noise, not ours to fix.
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ldap3(\.|$)")
                import ldap3
            from ldap3.core.exceptions import LDAPException
            from ldap3.operation.search import parse_filter
            from ldap3.utils.conv import escape_filter_chars
        except ImportError as e:  # pragma: no cover - the extra is part of the test install
            raise ImportError("the LDAP relay-map source needs ldap3: pip install 'mjfilter[ldap]'") from e
        self._ldap3 = ldap3
        self._LDAPException = LDAPException
        self._escape = escape_filter_chars

        host, port, use_ssl = self._parse_url(url)
        if not isinstance(base, str) or not base.strip():
            raise ValueError(f"LDAP relay-map base must be a DN to search under, got {base!r}")
        if (bind_dn is None) != (bind_password is None):
            raise ValueError("LDAP relay-map: give both bind_dn and bind_password, or neither (anonymous)")
        if bind_dn is not None and (not isinstance(bind_dn, str) or not bind_dn.strip()):
            raise ValueError(f"LDAP relay-map bind_dn must be a DN, got {bind_dn!r}")
        if bind_password is not None and (not isinstance(bind_password, str) or not bind_password):
            # An empty password is an "unauthenticated bind": the server treats it as anonymous.
            raise ValueError("LDAP relay-map bind_password must not be empty")
        for name, flt, placeholder in (("user_filter", user_filter, "{address}"),
                                       ("domain_filter", domain_filter, "{domain}")):
            if not isinstance(flt, str) or placeholder not in flt:
                raise ValueError(f"LDAP relay-map {name} must contain {placeholder} for the key, "
                                 f"e.g. {DEFAULT_USER_FILTER if name == 'user_filter' else DEFAULT_DOMAIN_FILTER!r}, "
                                 f"got {flt!r}")
            try:
                parse_filter(flt.replace(placeholder, "x"), None, True, True, None, False)
            except Exception as e:  # noqa: BLE001 - ldap3 raises a few kinds for a malformed filter
                raise ValueError(f"LDAP relay-map {name} {flt!r} is not a valid LDAP filter: {e}") from None
        if not isinstance(attribute, str) or not _ATTRIBUTE.fullmatch(attribute):
            raise ValueError(f"LDAP relay-map attribute must be an attribute name, got {attribute!r}")
        if not isinstance(timeout, (int, float)) or not timeout > 0 or not math.isfinite(timeout):
            raise ValueError(f"LDAP timeout must be a positive number of seconds, got {timeout!r}")

        self.url = url
        self.base = base
        self.bind_dn = bind_dn
        self._password = bind_password  # never log it
        self.user_filter = user_filter
        self.domain_filter = domain_filter
        self.attribute = attribute
        self.timeout = float(timeout)
        self._described = f"ldap:{url} base={base}"

        tls = None
        if use_ssl:
            import ssl

            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, sni=host)
        self._server_args: dict[str, Any] = {"host": host, "port": port, "use_ssl": use_ssl, "tls": tls,
                                             "get_info": ldap3.NONE, "connect_timeout": self.timeout}
        self._lock = threading.Lock()
        self._idle: list[tuple[Connection, float]] = []  # (connection, when it was put back)
        self._generation = 0  # bumped by close(): connections lent out before are not kept

    # -- construction ------------------------------------------------------------

    @staticmethod
    def _parse_url(url: str) -> tuple[str, int | None, bool]:
        shown = mask_url(url) if isinstance(url, str) else url  # in messages: never a password
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except (ValueError, AttributeError):
            raise ValueError(f"LDAP relay-map URL {shown!r} cannot be parsed") from None
        scheme = parts.scheme.lower()
        if scheme not in ("ldap", "ldaps"):
            raise ValueError(f"LDAP relay-map URL {shown!r}: the scheme must be ldap:// or ldaps://")
        if not parts.hostname:
            raise ValueError(f"LDAP relay-map URL {shown!r}: give a host, ldap://HOST[:PORT]")
        if parts.username is not None or parts.password is not None:
            raise ValueError("LDAP relay-map URL: put no credentials in the URL, give bind_dn and bind_password")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"LDAP relay-map URL {shown!r}: give only ldap[s]://HOST[:PORT] "
                             f"(the base DN and the filters are separate settings)")
        return parts.hostname, port, scheme == "ldaps"

    # -- use ---------------------------------------------------------------------

    def lookup(self, key: str) -> str | None:
        """The relay host for ``key`` (``user@domain`` or ``@domain``, used as given), stripped, or None.

        Raises :class:`LdapUnavailable` when the directory cannot answer.
        """
        search_filter = self._filter_for(key)
        if search_filter is None:
            return None
        for attempt in (1, 2):
            conn, reused, generation = self._acquire()
            try:
                value = self._search(conn, search_filter)
            except _Broken as e:
                self._discard(conn)
                if reused:
                    self._flush_idle()  # kept next to it: most likely just as dead
                    if attempt == 1 and not e.timed_out:
                        continue  # the server restarted or dropped an idle connection: try a new one
                raise LdapUnavailable(f"{self._described}: {e}") from None
            except LdapUnavailable:  # the server answered with an error: the connection is fine
                self._release(conn, generation)
                raise
            except BaseException:
                self._discard(conn)
                raise
            self._release(conn, generation)
            return value
        raise AssertionError("unreachable")  # pragma: no cover

    def describe(self) -> str:
        """``ldap:``, the URL and the base DN (never the password)."""
        return self._described

    def close(self) -> None:
        """Close the kept connections (idempotent). A later lookup would open new ones."""
        with self._lock:
            self._generation += 1
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._unbind(conn)

    def __repr__(self) -> str:
        return f"LdapSource({self._described!r})"

    # -- filters -----------------------------------------------------------------

    def _filter_for(self, key: str) -> str | None:
        """The search filter for ``key``; None for a key that cannot name anything ("", "@")."""
        if key.startswith("@"):
            domain = key[1:]
            if not domain:
                return None
            return self.domain_filter.replace("{domain}", self._escape(domain))
        if not key:
            return None
        return self.user_filter.replace("{address}", self._escape(key))

    # -- connections -------------------------------------------------------------

    def _acquire(self) -> tuple[Connection, bool, int]:
        """A kept connection (reused=True) or a new bound one; raises LdapUnavailable."""
        now = time.monotonic()
        stale: list[Connection] = []
        conn = None
        with self._lock:
            generation = self._generation
            while self._idle:
                candidate, since = self._idle.pop()
                if now - since > MAX_IDLE or candidate.closed:
                    stale.append(candidate)
                    continue
                conn = candidate
                break
        for old in stale:
            self._unbind(old)
        if conn is not None:
            return conn, True, generation
        return self._connect(), False, generation

    def _connect(self) -> Connection:
        ldap3 = self._ldap3
        # A new Server for each connection: an ldap3 Server that once failed to connect keeps
        # its address "unavailable" for a while (RESET_AVAILABILITY_TIMEOUT), which would delay
        # the first look-up after the directory comes back.
        server: Server = ldap3.Server(**self._server_args)
        conn = ldap3.Connection(
            server,
            user=self.bind_dn,
            password=self._password,
            authentication=ldap3.SIMPLE if self.bind_dn is not None else ldap3.ANONYMOUS,
            client_strategy=ldap3.SYNC,
            auto_bind=ldap3.AUTO_BIND_NONE,
            read_only=True,
            # ldap3 sets SO_RCVTIMEO from this with struct 'LL': whole seconds only (the exact,
            # float timeout is put on the socket once it is open, below).
            receive_timeout=max(1, math.ceil(self.timeout)),
            raise_exceptions=False,
            auto_referrals=False,
            check_names=False,
        )
        try:
            conn.open(read_server_info=False)
            if conn.socket is not None:
                conn.socket.settimeout(self.timeout)
            bound = conn.bind()
        except (self._LDAPException, OSError) as e:
            self._unbind(conn)
            raise LdapUnavailable(f"{self._described}: cannot connect: {self._reason(e)}") from None
        if not bound:
            result = conn.result or {}
            self._unbind(conn)
            who = f"as {self.bind_dn!r}" if self.bind_dn is not None else "anonymously"
            raise LdapUnavailable(f"{self._described}: bind {who} refused: {self._result_text(result)}")
        return conn

    def _release(self, conn: Connection, generation: int) -> None:
        with self._lock:
            if generation == self._generation and len(self._idle) < _MAX_KEPT and not conn.closed:
                self._idle.append((conn, time.monotonic()))
                return
        self._unbind(conn)

    def _discard(self, conn: Connection) -> None:
        self._unbind(conn)

    def _flush_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._unbind(conn)

    def _unbind(self, conn: Connection) -> None:
        try:
            conn.unbind()
        except Exception:  # noqa: BLE001 - the connection is being thrown away anyway
            with contextlib.suppress(Exception):
                if conn.socket is not None:
                    conn.socket.close()

    # -- search ------------------------------------------------------------------

    def _search(self, conn: Connection, search_filter: str) -> str | None:
        ldap3 = self._ldap3
        try:
            conn.search(self.base, search_filter, search_scope=ldap3.SUBTREE, attributes=[self.attribute],
                        size_limit=1, time_limit=max(1, math.ceil(self.timeout)))
        except (self._LDAPException, OSError) as e:
            raise _Broken(f"search failed: {self._reason(e)}", self._timed_out(e)) from None
        result: dict[str, Any] = conn.result or {}
        code = result.get("result")
        if code is None or conn.closed:  # no searchResDone: the session ended under us
            raise _Broken(f"search failed: {self._result_text(result) or 'connection closed'}", False)
        if code not in (_SUCCESS, _SIZE_LIMIT_EXCEEDED):
            raise LdapUnavailable(f"{self._described}: search under {self.base!r} failed: "
                                  f"{self._result_text(result)}")
        for entry in conn.response or []:
            if entry.get("type") != "searchResEntry":
                continue  # a continuation reference: not followed
            return self._first_value(entry.get("raw_attributes") or {})
        return None

    def _first_value(self, raw_attributes: dict[str, Any]) -> str | None:
        wanted = self.attribute.lower()
        for name, values in raw_attributes.items():
            if name.lower() != wanted:
                continue
            for value in values or []:
                if isinstance(value, (bytes, bytearray, memoryview)):
                    value = bytes(value).decode("utf-8", "replace")
                text = str(value).strip()
                if text:
                    return text
        return None

    # -- errors ------------------------------------------------------------------

    @staticmethod
    def _timed_out(e: BaseException) -> bool:
        from ldap3.core.exceptions import LDAPResponseTimeoutError

        if isinstance(e, (socket.timeout, LDAPResponseTimeoutError)):
            return True
        return "timed out" in str(e).lower()

    def _result_text(self, result: dict[str, Any]) -> str:
        text = str(result.get("description") or "")
        code = result.get("result")
        if code is not None:
            text = f"{text} ({code})" if text else f"result {code}"
        message = str(result.get("message") or "").strip()
        if message:
            text += f": {message}"
        return self._scrub(text)

    def _reason(self, e: BaseException) -> str:
        """Why an operation failed, in one line, without the password."""
        text = " ".join(str(e).split()) or e.__class__.__name__
        text = self._scrub(text)
        if len(text) > _MAX_REASON:
            text = text[: _MAX_REASON - 3] + "..."
        return f"{e.__class__.__name__}: {text}"

    def _scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text
