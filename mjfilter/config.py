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


class Config(Strict):
    """The whole configuration file."""

    state_dir: Path = DEFAULT_STATE_DIR
    milter: MilterConfig = MilterConfig()
    reinject: ReinjectConfig = ReinjectConfig()
    store: StoreConfig = StoreConfig()
    logging: LoggingConfig = LoggingConfig()
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
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
