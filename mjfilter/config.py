"""YAML configuration -> validated models, every error with ``file:line:col``.

Loading happens in two stages: ``load_config`` reads the YAML (rejecting syntax
errors and duplicate keys), resolves ``{$env: NAME}`` / ``{$file: path}``
secrets, and validates the core settings; the plugin manager then validates each
step's ``config`` with the plugin's own model (``Config.locate`` turns its error
locations into ``file:line:col`` too).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from collections.abc import Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:  # pragma: no cover
    from .model import Transaction

DEFAULT_STATE_DIR = Path("/var/lib/mjfilter")
ENV_CONFIG = "MJFILTER_CONFIG"
DEFAULT_CONFIG = Path("/etc/mjfilter/mjfilter.yaml")


# -- errors -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ConfigProblem:
    file: str
    line: int  # 1-based; 0 when unknown
    col: int  # 1-based; 0 when unknown
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` gives one ``file:line:col: reason`` per line."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# -- YAML with positions --------------------------------------------------------
Path_ = tuple[Any, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys."""

    def __init__(self, stream: str, filename: str) -> None:
        super().__init__(stream)
        self.filename = filename

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            if key in seen:
                first = seen[key].start_mark
                raise ConfigError(
                    [_problem(self.filename, key_node.start_mark,
                              f"duplicate key {key!r} (first defined at line {first.line + 1})")]
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _problem(filename: str, mark: Any, message: str) -> ConfigProblem:
    if mark is None:
        return ConfigProblem(filename, 0, 0, message)
    return ConfigProblem(filename, mark.line + 1, mark.column + 1, message)


def _index_positions(node: yaml.Node, path: Path_, out: dict[Path_, tuple[Any, Any]]) -> None:
    """Record (key mark, value mark) for every path in the document."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            sub = path + (key_node.value,)
            out[sub] = (key_node.start_mark, value_node.start_mark)
            _index_positions(value_node, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = path + (i,)
            out[sub] = (item.start_mark, item.start_mark)
            _index_positions(item, sub, out)


def read_yaml(path: Path) -> tuple[Any, dict[Path_, tuple[Any, Any]]]:
    """Parse one YAML document; return the data and the position of every path in it."""
    filename = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([ConfigProblem(filename, 0, 0, f"cannot read: {e.strerror or e}")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([ConfigProblem(filename, 0, 0, f"not UTF-8: {e}")]) from None
    loader = _Loader(text, filename)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        reason = " ".join(x for x in (e.context, e.problem) if x) or "YAML syntax error"
        raise ConfigError([_problem(filename, mark, f"YAML syntax error: {reason}")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([ConfigProblem(filename, 0, 0, f"YAML error: {e}")]) from None
    finally:
        loader.dispose()
    positions: dict[Path_, tuple[Any, Any]] = {}
    if node is not None:
        positions[()] = (node.start_mark, node.start_mark)
        _index_positions(node, (), positions)
    return data, positions


# -- secrets --------------------------------------------------------------------
def resolve_secrets(data: Any, base: Path, locate: Any, path: Path_ = ()) -> Any:
    """Replace ``{$env: NAME}`` and ``{$file: path}`` with the secret they name."""
    if isinstance(data, dict):
        if len(data) == 1 and next(iter(data)) in ("$env", "$file"):
            kind, ref = next(iter(data.items()))
            if not isinstance(ref, str) or not ref:
                raise ConfigError([locate(path, f"{kind} needs a name")])
            if kind == "$env":
                if ref not in os.environ:
                    raise ConfigError([locate(path, f"environment variable {ref} is not set")])
                return os.environ[ref]
            fpath = Path(ref) if Path(ref).is_absolute() else base / ref
            try:
                return fpath.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as e:
                raise ConfigError([locate(path, f"cannot read secret file {fpath}: {e.strerror or e}")]) from None
        return {k: resolve_secrets(v, base, locate, path + (k,)) for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_secrets(v, base, locate, path + (i,)) for i, v in enumerate(data)]
    return data


# -- models ---------------------------------------------------------------------
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_LISTEN = re.compile(
    r"^(?:(?P<kind>inet6?):(?:(?P<port1>\d+)@(?P<host1>[^@]+)|(?P<host2>\[[^\]]+\]|[^:\[\]]+):(?P<port2>\d+))"
    r"|(?:unix|local):(?P<path>/.+))$"
)


def parse_listen(spec: str) -> tuple[str, str | None, int | None, str | None]:
    """``inet:HOST:PORT`` (Postfix form), ``inet:PORT@HOST`` (Sendmail form), ``unix:/PATH``.

    Returns (kind, host, port, path).
    """
    m = _LISTEN.match(spec)
    if not m:
        raise ValueError(f"{spec!r} is not inet:HOST:PORT, inet:PORT@HOST or unix:/PATH")
    if m.group("path"):
        return ("unix", None, None, m.group("path"))
    host = (m.group("host1") or m.group("host2")).strip("[]")
    port = int(m.group("port1") or m.group("port2"))
    if not 0 < port < 65536:
        raise ValueError(f"{spec!r}: port {port} is out of range")
    return (m.group("kind"), host, port, None)


def libmilter_address(spec: str) -> str:
    """The form libmilter's smfi_setconn expects: ``inet:PORT@HOST`` or ``unix:/PATH``."""
    kind, host, port, path = parse_listen(spec)
    return f"unix:{path}" if kind == "unix" else f"{kind}:{port}@{host}"


class MilterConfig(Strict):
    """The milter front end (Postfix ``smtpd_milters``, Sendmail ``INPUT_MAIL_FILTER``)."""

    listen: str = Field("inet:127.0.0.1:8894", description="inet:HOST:PORT, inet:PORT@HOST or unix:/PATH")
    name: str = "mjfilter"
    timeout: int = Field(600, ge=1, description="seconds libmilter waits on the MTA")
    body_spool_bytes: int = Field(1 << 20, ge=0, description="bodies larger than this go to a temp file")
    max_message_bytes: int = Field(64 << 20, ge=1024, description="larger messages are refused with 552")
    chain_timeout: float = Field(120.0, gt=0, description="seconds one message may spend in the chain")
    socket_group: str | None = Field("postfix", description="group of a unix: socket (the MTA's group); "
                                                         "null leaves it as created")
    socket_mode: str = Field("0660", pattern=r"^0?[0-7]{3}$", description="permissions of a unix: socket (octal)")
    drain_timeout: float = Field(20.0, ge=0, description="on SIGTERM/SIGINT, seconds to let in-flight "
                                                         "transactions finish before exiting")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v


class ReinjectConfig(Strict):
    """Where extra copies go: the MTA's no-milter reinjection listener."""

    host: str = "127.0.0.1"
    port: int = Field(10026, ge=1, le=65535)
    timeout: float = Field(60.0, gt=0)
    local_hostname: str = "localhost"


class StoreConfig(Strict):
    url: str | None = Field(None, description="sqlite:///PATH (default: STATE_DIR/mjfilter.db) or redis://")
    timeout: float = Field(5.0, gt=0, description="seconds to wait for a locked or slow store")
    prefix: str = Field("mjfilter:", min_length=1, max_length=64,
                        description="key prefix on Redis (several deployments can share one server)")
    keep_events: int = Field(100000, ge=0, description="how many recent events the store keeps")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(sqlite:///.+|redis://.+|rediss://.+|unix://.+)$", v):
            raise ValueError("store url must be sqlite:///PATH, redis://HOST:PORT/DB, rediss://... or unix:///PATH")
        return v


class LoggingConfig(Strict):
    """Where log lines go: standard error (default) or the local syslog daemon."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    target: Literal["stderr", "syslog"] = "stderr"
    facility: str = Field("mail", description="syslog facility (mail, daemon, local0 ... local7)")
    syslog_socket: str = Field("/dev/log", description="the syslog daemon's unix socket")

    @field_validator("facility")
    @classmethod
    def _facility(cls, v: str) -> str:
        from logging.handlers import SysLogHandler

        if v.lower() not in SysLogHandler.facility_names:
            raise ValueError(f"unknown syslog facility {v!r} (try: mail, daemon, user, local0 ... local7)")
        return v.lower()

    @field_validator("syslog_socket")
    @classmethod
    def _socket(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("syslog_socket must be an absolute path (a unix socket such as /dev/log)")
        return v


def parse_host_port(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port); raise ``ValueError``."""
    host, sep, port_text = spec.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{spec!r} is not HOST:PORT (an IPv6 address in brackets: [::1]:9894)")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"{spec!r}: an IPv6 address must be written [ADDR]:PORT")
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"{spec!r}: an IPv6 address must be written [ADDR]:PORT")
    if any(c.isspace() for c in host):
        raise ValueError(f"{spec!r}: the host has a space")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{spec!r}: port {port} is out of range")
    return host, port




class MetricsConfig(Strict):
    """The Prometheus endpoint (``GET /metrics``); off unless ``listen`` is set."""

    listen: str | None = Field(None, description="HOST:PORT ([ADDR]:PORT for IPv6) to serve /metrics on")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            parse_host_port(v)
        return v

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to listen on, or None when metrics are off."""
        return parse_host_port(self.listen) if self.listen is not None else None


class ControlConfig(Strict):
    socket: str | None = Field(None, description="unix socket for `mjfilter reload` (default: STATE_DIR/control.sock)")


StrList = list[str]


class When(Strict):
    """A step runs only when every condition given here holds (lists: any item)."""

    sender: StrList | None = None  # glob on the envelope sender, case-insensitive
    sender_domain: StrList | None = None
    recipient: StrList | None = None  # any recipient matches
    auth_user: StrList | None = None  # glob on {auth_authen}
    authenticated: bool | None = None
    client: StrList | None = None  # CIDR networks of the client address
    header: dict[str, str] | None = None  # header name -> regex on the unfolded value

    @field_validator("sender", "sender_domain", "recipient", "auth_user", "client", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("client")
    @classmethod
    def _cidr(cls, v: StrList | None) -> StrList | None:
        for item in v or ():
            ipaddress.ip_network(item, strict=False)
        return v

    @field_validator("header")
    @classmethod
    def _regex(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for name, pattern in (v or {}).items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"header {name}: bad regular expression: {e}") from None
        return v

    def compile(self) -> "Rule":
        return Rule(self)


class StepConfig(Strict):
    use: str = Field(description="the plugin's entry-point name in group mjfilter.plugins")
    name: str | None = None
    when: When | None = None
    on_error: Literal["tempfail", "skip"] = "tempfail"
    config: dict[str, Any] | None = None

    @property
    def step_name(self) -> str:
        return self.name or self.use


# -- routing ------------------------------------------------------------------------
TlsPolicy = Literal["none", "may", "required", "implicit"]
TLS_POLICIES: tuple[str, ...] = ("none", "may", "required", "implicit")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_TRANSPORT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class SmarthostConfig(Strict):
    """One relay mjfilter can route to (MailerQ ``smarthost``, Postfix ``relayhost``)."""

    host: str = Field(description="host name or IP address")
    port: int | None = Field(None, ge=1, le=65535, description="default 25, or 465 with tls: implicit")
    mx: bool = Field(False, description="look up MX records of host (Postfix host:port) instead of "
                                        "connecting to host itself ([host]:port)")
    username: str | None = None
    password: str | None = Field(None, repr=False)
    tls: TlsPolicy = Field("may", description="none | may (STARTTLS if offered) | required (STARTTLS "
                                               "or fail) | implicit (TLS from the first byte, port 465)")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not v or any(c in v for c in " \t\r\n[]:,") and not _is_ipv6(v):
            raise ValueError(f"{v!r} is not a host name or IP address (write the port in `port:`)")
        return v

    @model_validator(mode="after")
    def _credentials(self) -> "SmarthostConfig":
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together (neither means no AUTH)")
        for v in (self.username, self.password):
            if v is not None and (not v or any(c in v for c in "\r\n\0")):
                raise ValueError("username/password must be non-empty and have no CR, LF or NUL")
        if self.username is not None and ":" in self.username:
            raise ValueError("username must not contain ':' (Postfix separates user:password at the first one)")
        return self

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else (465 if self.tls == "implicit" else 25)


def _is_ipv6(v: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(v), ipaddress.IPv6Address)
    except ValueError:
        return False


class PostfixMapsSource(Strict):
    """Postfix map source files, read directly (the text files ``postmap`` compiles)."""

    relay: str | None = Field(None, description="sender_dependent_relayhost_maps source: KEY [host]:port")
    sasl: str | None = Field(None, description="smtp_sasl_password_maps source: KEY user:password, "
                                               "KEY a sender (user@domain, @domain) or a next hop [host]:port")

    @model_validator(mode="after")
    def _some(self) -> "PostfixMapsSource":
        if self.relay is None and self.sasl is None:
            raise ValueError("give `relay:`, `sasl:` or both")
        return self


class SqlMapSource(Strict):
    """An SQL table of sender -> relay host (iRedMail ``sender_relayhost(account, relayhost)``)."""

    url: str = Field(description="sqlite:///PATH, postgresql://USER:PASS@HOST/DB, mysql+pymysql://...")
    query: str = Field("SELECT relayhost FROM sender_relayhost WHERE account = :account",
                       description="returns the relay host for :account (user@domain or @domain)")
    timeout: float = Field(5.0, gt=0)

    @field_validator("query")
    @classmethod
    def _account(cls, v: str) -> str:
        if ":account" not in v:
            raise ValueError("the query must use the bind parameter :account")
        return v


class LdapMapSource(Strict):
    """iRedMail's LDAP attribute ``senderRelayHost`` on the user or the domain entry."""

    url: str = Field(description="ldap://HOST:PORT or ldaps://HOST:PORT")
    base: str = Field(description="search base, e.g. o=domains,dc=example,dc=com")
    bind_dn: str | None = None
    bind_password: str | None = Field(None, repr=False)
    user_filter: str = Field("(&(objectClass=mailUser)(mail={address}))", description="for user@domain keys")
    domain_filter: str = Field("(&(objectClass=mailDomain)(domainName={domain}))", description="for @domain keys")
    attribute: str = "senderRelayHost"
    timeout: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _filters(self) -> "LdapMapSource":
        if "{address}" not in self.user_filter:
            raise ValueError("user_filter must contain {address}")
        if "{domain}" not in self.domain_filter:
            raise ValueError("domain_filter must contain {domain}")
        if (self.bind_dn is None) != (self.bind_password is None):
            raise ValueError("bind_dn and bind_password go together (neither: anonymous)")
        return self


class SenderMapSource(Strict):
    """One source of sender-dependent relay rules: exactly one of inline, postfix, sql, ldap."""

    inline: dict[str, str] | None = Field(None, description="KEY -> smarthost name or [host]:port")
    postfix: PostfixMapsSource | None = None
    sql: SqlMapSource | None = None
    ldap: LdapMapSource | None = None

    @model_validator(mode="after")
    def _one(self) -> "SenderMapSource":
        given = [k for k in ("inline", "postfix", "sql", "ldap") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("each sender_maps entry is exactly one of inline:, postfix:, sql:, ldap:")
        for key, value in (self.inline or {}).items():
            check_map_key(key)
            parse_relay(value)
        return self


class PerMessageRule(Strict):
    """Who may name a smarthost in x-mq-smarthost-* headers, and which hosts."""

    auth_user: StrList | None = Field(None, description="globs on the SMTP AUTH user")
    sender: StrList | None = Field(None, description="globs on the envelope sender")
    hosts: StrList = Field(description="host name globs (*.example.net), IP addresses or CIDR networks")
    allow_private: bool = Field(False, description="also loopback/private/link-local addresses for these hosts")

    @field_validator("auth_user", "sender", "hosts", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _who(self) -> "PerMessageRule":
        if self.auth_user is None and self.sender is None:
            raise ValueError("a per_message rule needs auth_user:, sender: or both (who it allows)")
        if not self.hosts:
            raise ValueError("hosts: must list at least one host")
        return self


class PerMessageConfig(Strict):
    """MailerQ per-message smarthost (x-mq-smarthost-hostname/-port/-username/-password)."""

    allow: list[PerMessageRule] = Field(default_factory=list, description="empty: nobody may")
    ports: list[int] = Field([25, 465, 587, 2525], description="ports a header may name")
    tls: TlsPolicy = "may"
    credential_ttl: float = Field(5 * 86400, gt=0, description="seconds per-message credentials are kept "
                                                               "for Postfix (its maximal_queue_lifetime)")

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for p in v:
            if not 1 <= p <= 65535:
                raise ValueError(f"port {p} is out of range")
        return v


class SinkConfig(Strict):
    """smtp-sink debug mode (MailerQ smtp-sink-*): every delivery connects here."""

    host: str
    port: int = Field(25, ge=1, le=65535)
    username: str | None = None
    password: str | None = Field(None, repr=False)
    tls: TlsPolicy = "none"

    @model_validator(mode="after")
    def _credentials(self) -> "SinkConfig":
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together (neither means no AUTH)")
        return self


class RoutingConfig(Strict):
    """Next-hop selection: smarthosts, sender maps, per-message smarthosts, priorities, sink."""

    socketmap: str = Field("inet:127.0.0.1:8895", description="inet:HOST:PORT or unix:/PATH where Postfix "
                                                              "asks for SASL credentials and relay hosts "
                                                              "(served only when routing is configured)")
    transport: str = Field("mjfilter", description="name prefix of the Postfix transports mjfilter routes to")
    tls: TlsPolicy = Field("may", description="TLS policy of a relay host from a map that is not one "
                                              "of the smarthosts")
    smarthosts: dict[str, SmarthostConfig] = Field(default_factory=dict)
    default: str | None = Field(None, description="smarthost name or [host]:port for mail no rule "
                                                  "routes (null: Postfix's own routing)")
    sender_maps: list[SenderMapSource] = Field(default_factory=list)
    recipient_delimiter: str = Field("+", description="Postfix recipient_delimiter: user+ext@domain "
                                                      "also tries user@domain")
    per_message: PerMessageConfig = PerMessageConfig()
    priority: dict[int, str] = Field(default_factory=dict, description="X-Mailjet-Prio level (0-3) -> "
                                                                       "Postfix transport name")
    sink: SinkConfig | None = None

    @field_validator("socketmap")
    @classmethod
    def _socketmap(cls, v: str) -> str:
        parse_listen(v)
        return v

    @property
    def enabled(self) -> bool:
        """Whether any rule can route a message (else the route step and the socketmap idle)."""
        return bool(self.default or self.sender_maps or self.per_message.allow or self.priority or self.sink)

    @field_validator("transport")
    @classmethod
    def _transport(cls, v: str) -> str:
        if not _TRANSPORT.match(v):
            raise ValueError(f"{v!r}: a transport name is lowercase letters, digits, - and _")
        return v

    @field_validator("smarthosts")
    @classmethod
    def _names(cls, v: dict[str, SmarthostConfig]) -> dict[str, SmarthostConfig]:
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"{name!r}: a smarthost name is letters, digits, '.', '-', '_'")
        return v

    @field_validator("priority")
    @classmethod
    def _priority(cls, v: dict[int, str]) -> dict[int, str]:
        for level, transport in v.items():
            if not 0 <= level <= 3:
                raise ValueError(f"priority level {level}: X-Mailjet-Prio levels are 0..3")
            if not _TRANSPORT.match(transport):
                raise ValueError(f"{transport!r}: a transport name is lowercase letters, digits, - and _")
            if transport in POSTFIX_SERVICES:
                raise ValueError(f"priority transport {transport!r} is a stock Postfix service name: pick another")
        return v

    @model_validator(mode="after")
    def _references(self) -> "RoutingConfig":
        seen: dict[str, str] = {}  # every transport name mjfilter can print -> what makes it
        for base in [self.transport, *dict.fromkeys(self.priority.values())]:
            names = [f"{base}{kind}-{t}" for kind in ("", "-mq", "-sender") for t in TLS_POLICIES]
            names += [base] if base != self.transport else []
            for name in names:
                if name in seen and seen[name] != base:
                    raise ValueError(f"transport name {name!r} would come from both {seen[name]!r} and {base!r} "
                                     "(routing.transport, routing.priority): pick other names")
                seen[name] = base
        values = [self.default] if self.default else []
        values += [v for src in self.sender_maps for v in (src.inline or {}).values()]
        for value in values:
            if value not in self.smarthosts:
                parse_relay(value)  # not a name: must be [host]:port
        if len(self.recipient_delimiter) > 1:
            raise ValueError("recipient_delimiter is one character (or empty: none)")
        return self


# master.cf services of a stock Postfix: a priority transport must not take their names.
POSTFIX_SERVICES = frozenset({
    "smtp", "relay", "local", "virtual", "lmtp", "error", "retry", "discard", "pickup", "cleanup", "qmgr",
    "tlsmgr", "rewrite", "bounce", "defer", "trace", "verify", "flush", "proxymap", "proxywrite", "showq",
    "anvil", "scache", "postlog", "smtpd", "submission", "submissions", "smtps", "uucp", "maildrop", "pipe",
})


def parse_relay(value: str) -> tuple[str, int, bool]:
    """Postfix relay syntax: ``[host]:port``, ``[host]``, ``host:port``, ``host`` -> (host, port, mx)."""
    v = value.strip()
    m = re.fullmatch(r"\[([^\]\s]+)\](?::(\d{1,5}))?|([^\s\[\]:,]+)(?::(\d{1,5}))?", v)
    if not m:
        raise ValueError(f"{value!r} is not a smarthost name or [host]:port")
    host = m.group(1) or m.group(3)
    if host.lower().startswith("ipv6:"):  # Postfix writes IPv6 literals [ipv6:2001:db8::1]
        host = host[5:]
    port = int(m.group(2) or m.group(4) or 25)
    if not 1 <= port <= 65535:
        raise ValueError(f"{value!r}: port {port} is out of range")
    return host, port, m.group(1) is None


def check_map_key(key: str) -> str:
    """A sender map key: ``user@domain``, ``user+ext@domain`` or ``@domain``."""
    k = key.strip()
    if not k or k.count("@") != 1 or k.endswith("@") or any(c.isspace() for c in k):
        raise ValueError(f"{key!r}: a sender map key is user@domain or @domain")
    return k


class Config(Strict):
    """The whole configuration file."""

    state_dir: Path = DEFAULT_STATE_DIR
    milter: MilterConfig = MilterConfig()
    reinject: ReinjectConfig = ReinjectConfig()
    store: StoreConfig = StoreConfig()
    logging: LoggingConfig = LoggingConfig()
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
    routing: RoutingConfig = RoutingConfig()
    chain: list[StepConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> "Config":
        seen: set[str] = set()
        for step in self.chain:
            if step.step_name in seen:
                raise ValueError(f"two chain steps are named {step.step_name!r}: give one a `name:`")
            seen.add(step.step_name)
        return self

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.state_dir / 'mjfilter.db'}"

    @property
    def control_socket(self) -> Path:
        return Path(self.control.socket) if self.control.socket else self.state_dir / "control.sock"


# -- rules ------------------------------------------------------------------------
class Rule:
    """A compiled ``when:`` rule; ``matches`` is called per message, so all parsing is done here."""

    __slots__ = ("_checks", "describe")

    def __init__(self, when: When) -> None:
        checks: list[Any] = []
        if when.sender is not None:
            pats = [p.lower() for p in when.sender]
            checks.append(lambda t: _glob(t.envelope.sender.lower(), pats))
        if when.sender_domain is not None:
            doms = [p.lower() for p in when.sender_domain]
            checks.append(lambda t: _glob(t.envelope.sender_domain, doms))
        if when.recipient is not None:
            rpats = [p.lower() for p in when.recipient]
            checks.append(lambda t: any(_glob(r.lower(), rpats) for r in t.envelope.recipients))
        if when.auth_user is not None:
            apats = [p.lower() for p in when.auth_user]
            checks.append(lambda t: t.auth_user is not None and _glob(t.auth_user.lower(), apats))
        if when.authenticated is not None:
            want = when.authenticated
            checks.append(lambda t: (t.auth_user is not None) == want)
        if when.client is not None:
            nets = [ipaddress.ip_network(c, strict=False) for c in when.client]
            checks.append(lambda t: _in_nets(t.connection.client_addr, nets))
        if when.header is not None:
            hrules = [(name, re.compile(p)) for name, p in when.header.items()]
            checks.append(
                lambda t: all(
                    (v := t.message.get_text(name)) is not None and rx.search(v) for name, rx in hrules
                )
            )
        self._checks = checks
        self.describe = ", ".join(k for k, v in when.model_dump(exclude_none=True).items())

    def matches(self, txn: "Transaction") -> bool:
        return all(check(txn) for check in self._checks)


def _glob(value: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(value, p) for p in patterns)


def _in_nets(addr: str | None, nets: list[Any]) -> bool:
    if not addr:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in nets)


# -- loading ------------------------------------------------------------------------
@dataclass(slots=True)
class LoadedConfig:
    """A validated configuration plus where each value came from."""

    config: Config
    path: Path
    positions: dict[Path_, tuple[Any, Any]] = field(default_factory=dict)

    def locate(self, path: Path_, message: str, key: bool = False) -> ConfigProblem:
        """A problem at ``path`` (the nearest enclosing position when ``path`` is absent)."""
        return locate_in(str(self.path), self.positions, path, message, key)

    def validation_problems(self, err: ValidationError, prefix: Path_ = ()) -> list[ConfigProblem]:
        return validation_problems(str(self.path), self.positions, err, prefix)


def locate_in(filename: str, positions: dict[Path_, tuple[Any, Any]], path: Path_, message: str,
              key: bool = False) -> ConfigProblem:
    p = tuple(path)
    while p and p not in positions:
        p = p[:-1]
    marks = positions.get(p)
    if marks is None:
        return ConfigProblem(filename, 1, 1, message)
    return _problem(filename, marks[0] if key or p != tuple(path) else marks[1], message)


def validation_problems(filename: str, positions: dict[Path_, tuple[Any, Any]], err: ValidationError,
                        prefix: Path_ = ()) -> list[ConfigProblem]:
    out = []
    for e in err.errors(include_url=False):
        loc = prefix + tuple(e["loc"])
        where = ".".join(str(x) for x in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}" + (f" in {'.'.join(str(x) for x in loc[:-1])}" if loc[:-1] else "")
            out.append(locate_in(filename, positions, loc, msg, key=True))
        elif e["type"] == "missing":
            out.append(locate_in(filename, positions, loc, f"{where}: required key is missing"))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            out.append(locate_in(filename, positions, loc, f"{where}: {msg}"))
    return out


def config_path(arg: str | os.PathLike[str] | None) -> Path:
    """The configuration file: ``-c``, else ``$MJFILTER_CONFIG``, else /etc/mjfilter/mjfilter.yaml."""
    if arg:
        return Path(arg)
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    return DEFAULT_CONFIG


def load_config(path: str | os.PathLike[str]) -> LoadedConfig:
    """Read, resolve and validate the core settings; raise ``ConfigError``."""
    p = Path(path)
    data, positions = read_yaml(p)
    filename = str(p)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([locate_in(filename, positions, (), "the top level must be a mapping of settings")])
    base = p.resolve().parent
    data = resolve_secrets(data, base, lambda path, msg: locate_in(filename, positions, path, msg))
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(validation_problems(filename, positions, e)) from None
    if not config.state_dir.is_absolute():
        config = config.model_copy(update={"state_dir": base / config.state_dir})
    return LoadedConfig(config, p, positions)
