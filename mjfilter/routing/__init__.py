"""Next-hop selection: smarthosts, sender-dependent relay maps, per-message smarthosts.

``Router`` is built from the ``routing:`` section. It answers two kinds of
question, from the same rules, so that what the milter decides at receipt and
what Postfix asks at delivery agree:

- ``decide(txn)``: where this message goes (a ``Decision``: Postfix transport,
  next hop, the relay and which rule chose it, or a refusal). The ``route``
  plugin calls it; the milter hands the result to Postfix as the internal
  ``X-Mjfilter-Route`` header, which ``milter_header_checks`` turns into
  ``FILTER transport:nexthop``.
- ``lookup(table, key)``: Postfix table lookups over the socketmap front end:
  ``sasl`` (``smtp_sasl_password_maps`` of the relay transports), ``mqsasl``
  (the per-message transport), ``relayhost`` (``sender_dependent_relayhost_maps``)
  and ``transport`` (``sender_dependent_default_transport_maps``).

Sender lookups follow Postfix's order: ``user+ext@domain``, ``user@domain``,
``@domain``, then the default. For each key every source is asked in the
configured order (inline YAML, Postfix map files, SQL, LDAP), so the most specific key
wins whatever source holds it, as with a Postfix map list.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Protocol

from ..config import TLS_POLICIES, PerMessageRule, RoutingConfig, SmarthostConfig, parse_relay
from .postfixmap import MapFile, MapFileError
from .vault import Vault

log = logging.getLogger("mjfilter.routing")

TABLES = ("sasl", "mqsasl", "relayhost", "transport", "credential")


class RoutingError(Exception):
    """A rule that cannot be applied (a bad map entry, a database that does not answer)."""


class Source(Protocol):
    describe: str

    def relay(self, key: str) -> str | None: ...

    def sasl(self, key: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Relay:
    """A host to deliver to: where, how (TLS policy), and with which credentials."""

    host: str
    port: int
    mx: bool = False  # host:port (MX lookup) instead of [host]:port
    tls: str = "may"
    name: str | None = None  # the smarthost's name when it is a configured one
    credentials: str | None = field(default=None, repr=False)  # "user:password"; None = no AUTH
    label: str | None = None  # the host name a per-message smarthost asked for (host is its address)
    # Credentials depend on the sender, not only on the host (a sasl_passwd entry keyed by
    # sender; two smarthosts at one next hop): the transport must look them up by sender,
    # which makes Postfix give up connection reuse. Otherwise by next hop, reusing connections.
    per_sender: bool = False

    @property
    def nexthop(self) -> str:
        host = f"ipv6:{self.host}" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.mx else f"[{host}]:{self.port}"

    @property
    def username(self) -> str | None:
        return self.credentials.partition(":")[0] if self.credentials else None

    def as_dict(self) -> dict[str, Any]:
        """Public view: never the password."""
        return {"name": self.name, "host": self.label or self.host, "nexthop": self.nexthop, "tls": self.tls,
                "username": self.username}


@dataclass(frozen=True, slots=True)
class Refusal:
    code: int
    status: str
    text: str


@dataclass(slots=True)
class Decision:
    """Where a message goes. No transport and no nexthop: Postfix routes it itself."""

    kind: str = "none"  # per-message | sender-map | default | priority | none
    relay: Relay | None = None
    rule: str = ""
    transport: str = ""
    nexthop: str = ""
    would: str = ""  # sink mode: the route the message would have taken
    refusal: Refusal | None = None
    remember: tuple[str, str, str, str | None] | None = None  # (sender, nexthop, host, credentials) for the vault

    @property
    def routed(self) -> bool:
        return bool(self.transport or self.nexthop)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rule": self.rule, "transport": self.transport, "nexthop": self.nexthop,
                "relay": self.relay.as_dict() if self.relay else None, "would": self.would or None}


# -- sources --------------------------------------------------------------------------------
class InlineSource:
    def __init__(self, entries: dict[str, str], index: int) -> None:
        self.entries = {k.strip().lower(): v.strip() for k, v in entries.items()}
        self.describe = f"sender_maps[{index}] inline"

    def relay(self, key: str) -> str | None:
        return self.entries.get(key)

    def sasl(self, key: str) -> str | None:
        return None


class PostfixSource:
    def __init__(self, relay: Path | None, sasl: Path | None, index: int) -> None:
        self.relay_map = MapFile(relay) if relay else None
        self.sasl_map = MapFile(sasl) if sasl else None
        self.describe = f"sender_maps[{index}] {relay or sasl}"

    def relay(self, key: str) -> str | None:
        return self.relay_map.get(key) if self.relay_map else None

    def sasl(self, key: str) -> str | None:
        return self.sasl_map.get(key) if self.sasl_map else None


class ExternalSource:
    """An SQL or LDAP source (``SqlSource``, ``LdapSource``): relay hosts only, and a source
    that cannot answer is a ``RoutingError`` (451 at receipt, TEMP to Postfix)."""

    def __init__(self, backend: Any, unavailable: type[Exception], index: int) -> None:
        self.backend = backend
        self.unavailable = unavailable
        self.describe = f"sender_maps[{index}] {backend.describe()}"

    def relay(self, key: str) -> str | None:
        try:
            return self.backend.lookup(key)  # type: ignore[no-any-return]
        except self.unavailable as e:
            raise RoutingError(f"{self.describe}: {e}") from None

    def sasl(self, key: str) -> str | None:
        return None

    def close(self) -> None:
        self.backend.close()


def sql_source(url: str, query: str, timeout: float, index: int) -> ExternalSource:
    from .sql import SqlSource, SqlUnavailable

    return ExternalSource(SqlSource(url, query, timeout), SqlUnavailable, index)


def ldap_source(cfg: Any, index: int) -> ExternalSource:
    from .ldap import LdapSource, LdapUnavailable

    return ExternalSource(LdapSource(cfg.url, cfg.base, cfg.bind_dn, cfg.bind_password, cfg.user_filter,
                                     cfg.domain_filter, cfg.attribute, cfg.timeout), LdapUnavailable, index)


# -- the router -------------------------------------------------------------------------------
class Router:
    def __init__(self, config: RoutingConfig, base: Path, state_dir: Path) -> None:
        self.config = config
        self.vault = Vault(state_dir, config.per_message.credential_ttl)
        self.smarthosts = {name: _relay_of(name, sh) for name, sh in config.smarthosts.items()}
        self._by_nexthop: dict[str, list[Relay]] = {}
        for r in self.smarthosts.values():
            self._by_nexthop.setdefault(r.nexthop.lower(), []).append(r)
        for nexthop, relays in self._by_nexthop.items():
            if len({r.credentials for r in relays}) > 1:  # one next hop, several accounts
                for r in relays:
                    self.smarthosts[r.name or ""] = replace(r, per_sender=True)
                self._by_nexthop[nexthop] = [self.smarthosts[r.name or ""] for r in relays]
        self.sources: list[Any] = []
        for i, src in enumerate(config.sender_maps):
            if src.inline is not None:
                self.sources.append(InlineSource(src.inline, i))
            elif src.postfix is not None:
                p = src.postfix
                self.sources.append(PostfixSource(_path(base, p.relay), _path(base, p.sasl), i))
            elif src.sql is not None:
                url = src.sql.url
                if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
                    url = f"sqlite:///{base / url[len('sqlite:///'):]}"  # relative to the config file
                self.sources.append(sql_source(url, src.sql.query, src.sql.timeout, i))
            elif src.ldap is not None:
                self.sources.append(ldap_source(src.ldap, i))
        self.default = self._value_relay(config.default, "") if config.default else None
        s = config.sink
        self.sink = Relay(s.host, s.port, tls=s.tls, name="sink",
                          credentials=f"{s.username}:{s.password}" if s.username and s.password else None
                          ) if s else None

    def close(self) -> None:
        for src in self.sources:
            if hasattr(src, "close"):
                src.close()

    # -- sender rules ---------------------------------------------------------------------------
    def sender_keys(self, sender: str) -> list[str]:
        """Postfix's lookup order: user+ext@domain, user@domain, @domain."""
        s = sender.strip().lower()
        if not s:
            return []
        local, at, domain = s.rpartition("@")
        if not at:
            return [s]
        if not local:
            return [s]
        keys = [s]
        d = self.config.recipient_delimiter
        if d and d in local:
            keys.append(f"{local.split(d, 1)[0]}@{domain}")
        keys.append("@" + domain)
        return keys

    def resolve(self, sender: str) -> tuple[Relay | None, str, str]:
        """(relay, kind, rule) for a sender: the first map hit in lookup order, else the default."""
        for key in self.sender_keys(sender):
            for src in self.sources:
                value = src.relay(key)
                if value:
                    return self._value_relay(value, sender), "sender-map", f"{src.describe}: {key} -> {value}"
        if self.default is not None:
            return self.default, "default", f"default -> {self.config.default}"
        return None, "none", ""

    def _value_relay(self, value: str, sender: str) -> Relay:
        if value in self.smarthosts:
            return self.smarthosts[value]
        try:
            host, port, mx = parse_relay(value)
        except ValueError as e:
            raise RoutingError(f"relay map value: {e}") from None
        probe = Relay(host, port, mx)
        known = self._by_nexthop.get(probe.nexthop.lower())
        if known:
            return known[0]
        credentials, by_sender = self._sasl(sender, probe.nexthop)
        return Relay(host, port, mx, tls=self.config.tls, credentials=credentials, per_sender=by_sender)

    def _sasl(self, sender: str, nexthop: str) -> tuple[str | None, bool]:
        """Credentials from the Postfix sasl_passwd sources (by sender keys, then by next hop),
        and whether a sender key gave them."""
        keys = self.sender_keys(sender)
        for i, key in enumerate([*keys, nexthop.lower()]):
            for src in self.sources:
                value = src.sasl(key)
                if value:
                    return value, i < len(keys)
        return None, False

    # -- per message --------------------------------------------------------------------------------
    def _allowing_rule(self, txn: Any) -> tuple[int, PerMessageRule] | None:
        sender = txn.envelope.sender.lower()
        user = (txn.auth_user or "").lower()
        for i, rule in enumerate(self.config.per_message.allow):
            if rule.auth_user is not None and not (user and any(fnmatchcase(user, p.lower()) for p in rule.auth_user)):
                continue
            if rule.sender is not None and not any(fnmatchcase(sender, p.lower()) for p in rule.sender):
                continue
            return i, rule
        return None

    def _per_message(self, txn: Any, store: Any) -> Decision:
        sh = txn.directives.smarthost
        pm = self.config.per_message
        host = sh.hostname.rstrip(".").lower()
        found = self._allowing_rule(txn)
        if found is None:
            return _refuse(550, "5.7.1", "per-message smarthost (x-mq-smarthost-hostname) not allowed for this sender")
        index, rule = found
        username, password = sh.username, sh.password
        if sh.credential_ref is not None:
            kept = self.vault.redeem(store, sh.credential_ref)
            if kept is None:
                return _refuse(451, "4.7.0", "x-mq-smarthost-username: credentials expired, try again")
            username, password = kept
            if not username or not password:
                return _refuse(550, "5.7.1", "x-mq-smarthost-username and x-mq-smarthost-password go together")
        if sh.port not in pm.ports:
            return _refuse(550, "5.7.1", f"smarthost port {sh.port} not allowed")
        literal = _ip(host)
        if literal is None and not any(_is_name_pattern(p) and fnmatchcase(host, p.lower()) for p in rule.hosts):
            return _refuse(550, "5.7.1", f"smarthost {host} not allowed for this sender")
        if literal is not None and not _listed(rule.hosts, literal):
            return _refuse(550, "5.7.1", f"smarthost {host} not allowed for this sender")
        if literal is not None:
            addrs = [literal]
        else:
            try:
                infos = socket.getaddrinfo(host, sh.port, type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                    return _refuse(550, "5.7.1", f"smarthost {host} does not resolve")
                return _refuse(451, "4.4.3", f"smarthost {host}: name lookup failed, try again later")
            addrs = list(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))
            addrs.sort(key=lambda a: a.version)
            if not addrs:
                return _refuse(550, "5.7.1", f"smarthost {host} does not resolve")
        for addr in addrs:
            kind = _special(addr)
            if kind and not rule.allow_private and not _listed(rule.hosts, addr):
                return _refuse(550, "5.7.1", f"smarthost {host} is a {kind} address ({addr})")
        creds = f"{username}:{password}" if username and password else None
        # The checked address, not the name: DNS cannot point Postfix elsewhere later.
        relay = Relay(str(addrs[0]), sh.port, tls=pm.tls, credentials=creds, label=host)
        return Decision("per-message", relay, f"x-mq-smarthost-hostname {host}:{sh.port} "
                                              f"(routing.per_message.allow[{index}])",
                        remember=(txn.envelope.sender, relay.nexthop, f"{host}:{sh.port}", creds))

    # -- the decision ---------------------------------------------------------------------------------
    def decide(self, txn: Any, store: Any = None) -> Decision:
        d = txn.directives
        for p in d.problems:
            if p.header.lower().startswith("x-mq-smarthost-"):
                return _refuse(550, "5.7.1", f"{p.header}: {p.reason}")
        prio = self.config.priority.get(d.priority) if d.priority is not None else None
        if d.smarthost is not None:
            dec = self._per_message(txn, store)
            if dec.refusal:
                return dec
        else:
            relay, kind, rule = self.resolve(txn.envelope.sender)
            dec = Decision(kind, relay, rule)
        if prio and not dec.rule:
            dec.kind, dec.rule = "priority", f"X-Mailjet-Prio {d.priority} -> routing.priority[{d.priority}]"
        elif prio:
            dec.rule += f"; X-Mailjet-Prio {d.priority} -> {prio}"
        relay = dec.relay
        mq = dec.kind == "per-message"
        if relay is not None:
            dec.transport = self.transport_name(relay.tls, prio, mq, relay.per_sender)
            dec.nexthop = relay.nexthop
        elif prio:
            dec.transport = prio  # to the recipient domain's MX, through the priority's transport
        if self.sink is not None:
            dec.would = f"{dec.transport}:{dec.nexthop}" if dec.routed else "postfix-default"
            if relay is not None:
                dec.would += f" smarthost={relay.name or relay.label or relay.host}"
            dec.transport = self.transport_name(self.sink.tls, prio, mq)
            dec.nexthop = self.sink.nexthop
        return dec

    def transport_name(self, tls: str, prio: str | None = None, mq: bool = False, per_sender: bool = False) -> str:
        base = prio or self.config.transport
        return f"{base}-mq-{tls}" if mq else f"{base}-sender-{tls}" if per_sender else f"{base}-{tls}"

    def _may_be_per_sender(self) -> bool:
        return any(r.per_sender for r in self.smarthosts.values()) or any(
            isinstance(s, PostfixSource) and s.sasl_map is not None for s in self.sources)

    def transports(self) -> list[tuple[str, str, str | None, bool]]:
        """Every transport a decision can name: (name, tls policy or "" for MX delivery, sasl table,
        sender-dependent authentication)."""
        cfg = self.config
        relay_tls = {r.tls for r in self.smarthosts.values()}
        if cfg.sender_maps or (cfg.default and cfg.default not in self.smarthosts):
            relay_tls.add(cfg.tls)
        mq_tls = {cfg.per_message.tls} if cfg.per_message.allow else set()
        if self.sink is not None:
            relay_tls = {self.sink.tls}
            mq_tls = {self.sink.tls} if mq_tls else set()
        per_sender = self.sink is None and self._may_be_per_sender()
        out: list[tuple[str, str, str | None, bool]] = []
        for prio in [None, *dict.fromkeys(cfg.priority.values())]:
            if prio is not None and self.sink is None:
                out.append((prio, "", None, False))
            for tls in TLS_POLICIES:
                if tls in relay_tls:
                    out.append((self.transport_name(tls, prio), tls, "sasl", False))
                    if per_sender:
                        out.append((self.transport_name(tls, prio, per_sender=True), tls, "sasl", True))
                if tls in mq_tls:
                    out.append((self.transport_name(tls, prio, mq=True), tls, "mqsasl", True))
        return out

    # -- Postfix table lookups (the socketmap front end) ------------------------------------------
    def blocking(self, table: str, key: str) -> bool:
        """Whether ``lookup(table, key)`` may wait on I/O (the store, SQL, LDAP)."""
        if table == "credential":
            return not key[:9].lower().startswith("received")  # a Received line only resets state
        if table in ("sasl", "relayhost", "transport"):
            return self.sink is None and any(isinstance(s, ExternalSource) for s in self.sources)
        return True

    def lookup(self, table: str, key: str, store: Any) -> str | None:
        """The value for ``key`` in ``table``, or None (NOTFOUND).

        Raises ``RoutingError`` (answered TEMP) when the answer cannot be given now.
        """
        key = key.strip()
        if table == "sasl":
            if self.sink is not None:
                return self.sink.credentials
            if "@" in key and not key.startswith("["):
                relay, _, _ = self.resolve(key)
                return relay.credentials if relay else None
            return self._sasl_by_host(key)
        if table == "mqsasl":
            if self.sink is not None:
                return self.sink.credentials
            found = self.vault.find(store, key)
            if found.conflict and not ("@" in key and not key.startswith("[")):
                raise RoutingError(f"conflicting per-message credentials for {key}")
            return found.credentials
        if table in ("relayhost", "transport"):
            if self.sink is not None:
                relay: Relay | None = self.sink
            else:
                relay, _, _ = self.resolve(key)
            if relay is None:
                return None
            if table == "relayhost":
                return relay.nexthop
            return f"{self.transport_name(relay.tls, per_sender=relay.per_sender)}:{relay.nexthop}"
        raise RoutingError(f"unknown table {table!r} (mjfilter answers {', '.join(TABLES)})")

    def _sasl_by_host(self, key: str) -> str | None:
        """Credentials by next hop ``[host]:port`` (or a bare host name): Postfix asks so on the
        transports that are not sender-dependent, and for mail with a null sender.

        Only an unambiguous answer: a host name several smarthosts share (on other ports,
        with other accounts) answers nothing, and Postfix then asks by ``[host]:port``.
        """
        k = key.lower()
        candidates = self._by_nexthop.get(k) or [r for r in self.smarthosts.values() if r.host.lower() == k]
        found = {r.credentials for r in candidates if r.credentials}
        if len(found) == 1 and all(r.credentials for r in candidates):
            return found.pop()
        if candidates:
            return None
        for src in self.sources:
            value = src.sasl(k)
            if value:
                return value
        return None


# -- helpers -----------------------------------------------------------------------------------------
def _relay_of(name: str, sh: SmarthostConfig) -> Relay:
    creds = f"{sh.username}:{sh.password}" if sh.username is not None and sh.password is not None else None
    return Relay(sh.host, sh.effective_port, sh.mx, sh.tls, name, creds)


def _path(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value)
    return p if p.is_absolute() else base / p


def _refuse(code: int, status: str, text: str) -> Decision:
    return Decision(refusal=Refusal(code, status, text))


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_name_pattern(pattern: str) -> bool:
    p = pattern.strip("[]")
    if _ip(p) is not None:
        return False
    try:
        ipaddress.ip_network(p, strict=False)
        return False
    except ValueError:
        return True


def _listed(patterns: list[str], addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``addr`` is named in ``patterns`` by itself or by a CIDR network."""
    for p in patterns:
        try:
            if addr in ipaddress.ip_network(p.strip("[]"), strict=False):
                return True
        except ValueError:
            continue
    return False


def _special(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``addr`` is not a public unicast address, or None."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for attr, what in (("is_loopback", "loopback"), ("is_link_local", "link-local"),
                       ("is_unspecified", "unspecified"), ("is_multicast", "multicast"),
                       ("is_private", "private"), ("is_reserved", "reserved")):
        if getattr(addr, attr):
            return what
    if not addr.is_global:
        return "non-public"
    return None


def open_router(config: RoutingConfig, base: Path, state_dir: Path) -> Router:
    """A ``Router``; a map file that cannot be read raises ``MapFileError`` (file:line: reason)."""
    return Router(config, base, state_dir)


__all__ = ["Decision", "MapFileError", "Refusal", "Relay", "Router", "RoutingError", "TABLES", "open_router"]
