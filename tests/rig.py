"""Test rig: a throwaway Postfix on loopback, a recording SMTP sink, SMTP helpers.

The integration tests run mail through a real Postfix::

    test --smtp_send--> PostfixRig smtpd (127.0.0.1:smtp_port)
                          | (milters, queue)
                          v
                        relayhost = [127.0.0.1]:relay_port --> Sink (aiosmtpd)

* :class:`Sink` is an in-process aiosmtpd ``Controller`` that answers 250 to
  everything and records each message (envelope and the raw bytes received,
  dot-unstuffed, CRLF line endings, never decoded).
* :class:`PostfixRig` is a private Postfix instance whose configuration, queue,
  data directory and log all live under one base directory (a pytest
  ``tmp_path``). It writes its own ``main.cf`` and ``master.cf`` (every service
  ``chroot = n``), logs to ``BASE/maillog`` through ``postlogd`` (no syslog
  needed), relays everything to ``[127.0.0.1]:relay_port`` and retries deferred
  mail within seconds. It is started with ``postfix -c DIR start`` and stopped
  like ``postfix -c DIR stop`` does (SIGTERM to its master), polling until every
  process of the instance is gone; only processes of this instance (identified
  by ``MAIL_CONFIG=DIR`` in their environment or by the master's process group)
  are ever signalled. It must run as root (``mail_owner = postfix``).
* :func:`smtp_send` / :func:`smtp_send_many` submit messages and return the
  final SMTP reply instead of raising on 4xx/5xx.

Readiness is always polled with a deadline (:func:`wait_port`,
:func:`wait_unix`, :meth:`Sink.wait_for`, :meth:`PostfixRig.wait_log`), never
waited for with one fixed sleep.

Usage::

    with Sink() as sink, PostfixRig(tmp_path, relay_port=sink.port) as pf:
        assert smtp_send(pf.smtp_port, "a@x.example", ["b@y.example"], data).code == 250
        [msg] = sink.wait_for(1)

Layout under ``base``: ``conf/`` (main.cf, master.cf), ``queue/``
(queue_directory), ``data/`` (data_directory), ``maillog``.

Permissions: the Postfix daemons run as user ``postfix`` and open some files by
absolute path (master opens ``data_directory/master.lock`` as ``postfix``), but
pytest's ``/tmp/pytest-of-root`` and ``pytest-N`` are mode 0700. The rig therefore
adds o+x (search only, not read) to ``base`` and to those parents
(:func:`make_traversable`, which stops at the first directory that is already
searchable). The same makes a unix-socket milter under ``base`` reachable by
smtpd; a socket elsewhere under ``tmp_path`` needs ``make_traversable`` too.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

LOOPBACK = "127.0.0.1"
_POLL = 0.05  # seconds between readiness probes

__all__ = [
    "LOOPBACK",
    "PostfixRig",
    "Received",
    "Reply",
    "Sink",
    "free_port",
    "make_traversable",
    "smtp_send",
    "smtp_send_many",
    "wait_port",
    "wait_unix",
]


# --------------------------------------------------------------------------- ports and sockets


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    """Poll until a TCP connect to ``host:port`` succeeds; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(1.0, timeout)):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing accepts connections on {host}:{port} after {timeout:g}s (last error: {last})")
        time.sleep(_POLL)


def wait_unix(path: str | os.PathLike[str], timeout: float = 15.0) -> None:
    """Poll until a connect to the unix socket ``path`` succeeds; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(min(1.0, timeout))
                s.connect(os.fspath(path))
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing accepts connections on unix:{path} after {timeout:g}s (last error: {last})")
        time.sleep(_POLL)


def stop_server(proc: subprocess.Popen[bytes], name: str,
                steps: Sequence[tuple[signal.Signals, float]] = ((signal.SIGTERM, 10.0),)) -> None:
    """Stop a server started with ``start_new_session=True``: each (signal, seconds) in turn
    until it exits, then SIGKILL to its whole process group (its own session: surely ours
    while it is alive and not reaped). Raise if it survives that."""
    for sig, wait in [*steps, (signal.SIGKILL, 5.0)]:
        if proc.poll() is not None:
            return
        try:
            if sig == signal.SIGKILL:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        raise RuntimeError(f"{name} (pid {proc.pid}) survived SIGKILL")


def make_traversable(path: str | os.PathLike[str]) -> None:
    """Add o+x to ``path`` and each of its parents, so user ``postfix`` can reach a socket there.

    Meant for pytest's private temp tree (``/tmp/pytest-of-root`` is 0700); it stops at
    the first parent that is already searchable by others, so system directories are
    never touched.
    """
    p = Path(path).resolve()
    for d in [p, *p.parents]:
        mode = d.stat().st_mode
        if mode & 0o001:
            if d != p:
                break
            continue
        os.chmod(d, (mode & 0o7777) | 0o001)


# --------------------------------------------------------------------------- sink


@dataclass(frozen=True)
class Received:
    """One message as the sink received it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # raw DATA bytes, dot-unstuffed, CRLF line endings, not decoded
    mail_options: list[str] = field(default_factory=list)  # MAIL FROM ESMTP args (SIZE=, BODY=, RET=, ENVID=)
    rcpt_options: list[str] = field(default_factory=list)  # RCPT TO ESMTP args of all recipients (NOTIFY=, ORCPT=)
    auth_user: str | None = None  # the login the client authenticated as (sinks with ``users``)
    tls: bool = False  # the session was encrypted (STARTTLS)

    @property
    def header_block(self) -> bytes:
        """The header section, without the blank line that ends it."""
        return self.data.split(b"\r\n\r\n", 1)[0]

    @property
    def body(self) -> bytes:
        """Everything after the first empty line (b"" if there is none)."""
        parts = self.data.split(b"\r\n\r\n", 1)
        return parts[1] if len(parts) == 2 else b""

    def headers(self, name: str) -> list[str]:
        """Unfolded values of every header called ``name`` (case-insensitive), in order."""
        out: list[str] = []
        want = name.lower().encode()
        for raw in re.split(rb"\r\n(?![ \t])", self.header_block):
            key, sep, value = raw.partition(b":")
            if sep and key.strip().lower() == want:
                out.append(re.sub(rb"\r\n(?=[ \t])", b"", value).strip().decode("utf-8", "surrogateescape"))
        return out


class _Recorder:
    """aiosmtpd handler: answer 250 to DATA and keep the message."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content
        if raw is None:  # pragma: no cover - aiosmtpd always sets it
            raw = envelope.content if isinstance(envelope.content, bytes) else b""
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        tls = session.ssl is not None
        self._sink._record(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(raw),
                mail_options=list(envelope.mail_options),
                rcpt_options=list(envelope.rcpt_options),
                auth_user=login.decode("utf-8", "replace") if login is not None else None,
                tls=tls,
            )
        )
        return "250 OK sink"


@cache
def _self_signed_context() -> ssl.SSLContext:
    """A server TLS context with a throwaway self-signed certificate for 127.0.0.1."""
    import datetime
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sink.test.invalid")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2)).sign(key, hashes.SHA256()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (Path(d) / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        ctx.load_cert_chain(Path(d) / "cert.pem", Path(d) / "key.pem")
    return ctx


class Sink:
    """A recording SMTP server (aiosmtpd) on 127.0.0.1.

    ``port`` is chosen free unless given (give the old port to "restart" a sink after
    :meth:`stop`). Messages are kept in arrival order; access is thread-safe.
    With ``users`` ({login: password}) the sink requires SMTP AUTH (PLAIN/LOGIN, no
    TLS needed) and records who authenticated; wrong credentials get 535.
    """

    def __init__(self, port: int | None = None, users: dict[str, str] | None = None, starttls: bool = False,
                 implicit_tls: bool = False) -> None:
        self.port: int = port if port is not None else free_port()
        self.users = dict(users) if users else None
        self.starttls = starttls  # offer and require STARTTLS (a self-signed certificate)
        self.implicit_tls = implicit_tls  # TLS from the first byte, as on port 465
        self.auth_failures = 0
        self._lock = threading.Condition()
        self._messages: list[Received] = []
        self._controller: Controller | None = None

    # -- lifecycle
    def start(self) -> Self:
        if self._controller is not None:
            return self
        controller = Controller(
            _Recorder(self),
            hostname=LOOPBACK,
            port=self.port,
            server_hostname="sink.test.invalid",
            decode_data=False,
            enable_SMTPUTF8=True,
            ready_timeout=10.0,
            **({"auth_required": True, "auth_require_tls": self.starttls, "authenticator": self._authenticate}
               if self.users is not None else {}),
            **({"tls_context": _self_signed_context(), "require_starttls": True} if self.starttls else {}),
            **({"ssl_context": _self_signed_context()} if self.implicit_tls else {}),
        )
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        if self._controller is not None:
            controller, self._controller = self._controller, None
            controller.stop()

    @property
    def running(self) -> bool:
        return self._controller is not None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _authenticate(self, server: AioSMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: object) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and self.users is not None
              and self.users.get(auth_data.login.decode("utf-8", "replace")) == auth_data.password.decode(
                  "utf-8", "replace"))
        if not ok:
            with self._lock:
                self.auth_failures += 1
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    # -- records
    def _record(self, msg: Received) -> None:
        with self._lock:
            self._messages.append(msg)
            self._lock.notify_all()

    @property
    def messages(self) -> list[Received]:
        """A snapshot of everything received so far."""
        with self._lock:
            return list(self._messages)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    def wait_for(self, n: int, timeout: float = 30.0) -> list[Received]:
        """Wait until at least ``n`` messages arrived; return all of them (a snapshot)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._messages) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"sink on port {self.port}: {len(self._messages)} message(s) arrived, "
                        f"expected at least {n} within {timeout:g}s"
                    )
                self._lock.wait(min(left, 0.25))
            return list(self._messages)


# --------------------------------------------------------------------------- SMTP client helpers


class Reply(NamedTuple):
    """An SMTP reply: ``code`` (-1 when the connection failed) and its text."""

    code: int
    message: str


Item = tuple[str, Sequence[str], bytes]  # (sender, recipients, data)


def _text(msg: bytes | str) -> str:
    return msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg


def _transaction(smtp: smtplib.SMTP, sender: str, rcpts: Sequence[str], data: bytes) -> Reply:
    """MAIL, RCPT..., DATA on an open session; the reply that ended the transaction."""
    code, msg = smtp.mail(sender)
    if code != 250:
        smtp.rset()
        return Reply(code, _text(msg))
    accepted = 0
    refused = Reply(554, "no recipients given")
    for rcpt in rcpts:
        code, msg = smtp.rcpt(rcpt)
        if code in (250, 251):
            accepted += 1
        else:
            refused = Reply(code, _text(msg))
    if not accepted:
        smtp.rset()
        return refused
    try:
        code, msg = smtp.data(data)
    except smtplib.SMTPDataError as e:  # DATA itself refused (no 354)
        smtp.rset()
        return Reply(e.smtp_code, _text(e.smtp_error))
    return Reply(code, _text(msg))


def _connect(port: int, timeout: float) -> smtplib.SMTP:
    smtp = smtplib.SMTP(LOOPBACK, port, local_hostname="client.test.invalid", timeout=timeout)
    smtp.ehlo()
    return smtp


def smtp_send(port: int, sender: str, rcpts: Sequence[str], data: bytes, timeout: float = 30.0) -> Reply:
    """Send one message to 127.0.0.1:``port`` and return the final reply (never raises on 4xx/5xx).

    The final reply is that of DATA when at least one recipient was accepted (refused
    recipients are then ignored), else that of MAIL FROM or of the last refused RCPT TO.
    ``data`` is sent as-is (smtplib only dot-stuffs it): give CRLF line endings.
    A connection failure is reported as ``Reply(-1, text)`` or with the server's code.
    """
    return smtp_send_many(port, [(sender, rcpts, data)], timeout=timeout)[0]


def smtp_send_many(port: int, items: Iterable[Item], timeout: float = 30.0) -> list[Reply]:
    """Send several ``(sender, rcpts, data)`` messages over one SMTP connection.

    Returns one :class:`Reply` per item, in order. If the server drops the connection
    (e.g. 421), that item gets the 421 / -1 reply and every later item
    ``Reply(-1, "not sent: ...")``.
    """
    items = list(items)
    replies: list[Reply] = []
    try:
        smtp = _connect(port, timeout)
    except smtplib.SMTPResponseException as e:
        return [Reply(e.smtp_code, _text(e.smtp_error))] * len(items)
    except (OSError, smtplib.SMTPException) as e:
        return [Reply(-1, f"connection failed: {e}")] * len(items)
    try:
        for sender, rcpts, data in items:
            try:
                replies.append(_transaction(smtp, sender, rcpts, data))
            except smtplib.SMTPResponseException as e:
                replies.append(Reply(e.smtp_code, _text(e.smtp_error)))
            except (OSError, smtplib.SMTPException) as e:
                replies.append(Reply(-1, f"connection lost: {e}"))
            if replies[-1].code in (-1, 421):
                break
        replies += [Reply(-1, "not sent: connection closed")] * (len(items) - len(replies))
    finally:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            smtp.close()
    return replies


# --------------------------------------------------------------------------- Postfix


_NOT_INSTALLED = "postfix is not installed: run make test, which installs it"


def _find(cmd: str) -> str:
    for d in (*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/usr/local/sbin", "/sbin"):
        if d and os.access(os.path.join(d, cmd), os.X_OK):
            return os.path.join(d, cmd)
    raise RuntimeError(_NOT_INSTALLED)


@cache
def _postfix_defaults() -> dict[str, str]:
    """``postconf -d`` of the installed Postfix (parameter -> default value)."""
    out = subprocess.run([_find("postconf"), "-d"], capture_output=True, text=True, check=True).stdout
    defaults: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            defaults[name.strip()] = value
        elif line.endswith(" ="):
            defaults[line[:-2].strip()] = ""
    return defaults


def _version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", _postfix_defaults().get("mail_version", "0.0"))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _compatibility_level() -> str:
    """The highest compatibility level this Postfix knows of, so it logs no compatibility warnings."""
    v = _version()
    if v >= (3, 6):
        return "3.6"  # levels went 0, 1, 2, then 3.6 (the first versioned one)
    return "2" if v >= (3, 0) else "1"


# Services of master.cf: (name, type, private, unpriv, wakeup, maxproc, command); chroot is always n.
_SERVICES: list[tuple[str, str, str, str, str, str, str]] = [
    ("pickup", "unix", "n", "-", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "300", "1", "qmgr"),
    ("tlsmgr", "unix", "-", "-", "1000?", "1", "tlsmgr"),  # the smtp client's TLS (tls: required)
    ("rewrite", "unix", "-", "-", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "-", "-", "proxymap"),
    ("proxywrite", "unix", "-", "-", "-", "1", "proxymap"),
    ("smtp", "unix", "-", "-", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "-", "-", "showq"),
    ("error", "unix", "-", "-", "-", "-", "error"),
    ("retry", "unix", "-", "-", "-", "-", "error"),
    ("discard", "unix", "-", "-", "-", "-", "discard"),
    ("local", "unix", "-", "n", "-", "-", "local"),
    ("virtual", "unix", "-", "n", "-", "-", "virtual"),
    ("lmtp", "unix", "-", "-", "-", "-", "lmtp"),
    ("anvil", "unix", "-", "-", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "-", "1", "postlogd"),
]

_LIVE_RIGS: weakref.WeakSet[PostfixRig] = weakref.WeakSet()


@atexit.register
def _stop_live_rigs() -> None:
    """Last resort: never leave a master daemon behind when the test process exits."""
    for rig in list(_LIVE_RIGS):
        try:
            rig.stop()
        except Exception as e:  # noqa: BLE001 - best effort at exit
            print(f"rig: could not stop Postfix under {rig.base}: {e}", file=sys.stderr)


class PostfixRig:
    """A private Postfix instance under ``base``, listening on 127.0.0.1:``smtp_port``.

    Everything is relayed to ``[127.0.0.1]:relay_port``. ``main_cf`` adds or overrides
    main.cf parameters (e.g. ``{"smtpd_milters": "inet:127.0.0.1:9000"}``);
    ``master_cf`` is appended verbatim to the generated master.cf (extra listeners);
    ``smtpd_options`` become ``-o name=value`` of the main smtpd listener only.
    Files: ``conf_dir`` (``-c`` directory), ``queue_dir``, ``data_dir``, ``maillog_path``.
    """

    def __init__(
        self,
        base: Path,
        relay_port: int,
        main_cf: dict[str, str] | None = None,
        master_cf: str = "",
        smtp_port: int | None = None,
        smtpd_options: dict[str, str] | None = None,
    ) -> None:
        self.postfix_cmd = _find("postfix")
        if os.geteuid() != 0:
            raise RuntimeError("PostfixRig must run as root (mail_owner = postfix, private queue directories)")
        self.postqueue_cmd = _find("postqueue")
        self.postconf_cmd = _find("postconf")
        self.base = Path(base).resolve()
        self.relay_port = relay_port
        self.smtp_port = smtp_port if smtp_port is not None else free_port()
        self.conf_dir = self.base / "conf"
        self.queue_dir = self.base / "queue"
        self.data_dir = self.base / "data"
        self.maillog_path = self.base / "maillog"
        self.extra_main_cf = dict(main_cf or {})
        self.extra_master_cf = master_cf
        self.smtpd_options = dict(smtpd_options or {})
        self._master_pid: int | None = None

    # -- configuration
    def main_cf_params(self) -> dict[str, str]:
        """The main.cf parameters this rig writes (defaults, then the caller's overrides)."""
        p: dict[str, str] = {
            "compatibility_level": _compatibility_level(),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "rig.test.invalid",
            "mydomain": "test.invalid",
            "myorigin": "$myhostname",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "relayhost": f"[{LOOPBACK}]:{self.relay_port}",
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.base),
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "smtp_helo_name": "$myhostname",
            # Fast retries of deferred mail.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "4s",
            "smtp_connect_timeout": "2s",
            "delay_warning_time": "0h",
            # No throttling of test traffic.
            "in_flow_delay": "0s",
            "smtpd_error_sleep_time": "0s",
            "smtpd_soft_error_limit": "1000",
            "smtpd_hard_error_limit": "1000",
            "smtpd_client_connection_rate_limit": "0",
            # Milters: explicit default action (3.11 changes it), short timeouts.
            "milter_default_action": "tempfail",
            "milter_connect_timeout": "5s",
            "milter_command_timeout": "10s",
            "milter_content_timeout": "20s",
        }
        if "smtpd_peername_lookup" not in _postfix_defaults():  # Postfix < 3.5
            del p["smtpd_peername_lookup"]
        p.update(self.extra_main_cf)
        return p

    def master_cf_text(self) -> str:
        """The master.cf this rig writes: every service with chroot = n."""
        fmt = "{:<24} {:<10} {:<7} {:<7} {:<7} {:<7} {:<7} {}"
        lines = [
            "# Written by tests/rig.py: a private test instance, nothing chrooted.",
            fmt.format("# service", "type", "private", "unpriv", "chroot", "wakeup", "maxproc", "command"),
            fmt.format(f"{LOOPBACK}:{self.smtp_port}", "inet", "n", "-", "n", "-", "-", "smtpd"),
        ]
        lines += [f"  -o {k}={v}" for k, v in self.smtpd_options.items()]
        for name, kind, private, unpriv, wakeup, maxproc, command in _SERVICES:
            lines.append(fmt.format(name, kind, private, unpriv, "n", wakeup, maxproc, command))
        text = "\n".join(lines) + "\n"
        if self.extra_master_cf:
            text += self.extra_master_cf.rstrip("\n") + "\n"
        return text

    def write_config(self) -> None:
        """Create the directories and write main.cf and master.cf."""
        for d in (self.conf_dir, self.queue_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        main = "# Written by tests/rig.py: a private test instance.\n" + "".join(
            f"{k} = {v}\n" for k, v in self.main_cf_params().items()
        )
        (self.conf_dir / "main.cf").write_text(main)
        (self.conf_dir / "master.cf").write_text(self.master_cf_text())
        # Postfix re-reads a table file modified within the current second (0.3 s sleeps, ~2 s
        # in all) to avoid reading it half-written: back-date our files so start is instant.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.conf_dir / name, (past, past))
        # Postfix refuses a data_directory not owned by mail_owner ("master.lock: Permission denied"),
        # and master opens master.lock by absolute path as mail_owner, so the path must be searchable.
        shutil.chown(self.data_dir, "postfix", "root")
        make_traversable(self.base)
        self.maillog_path.touch(exist_ok=True)

    # -- commands
    def _run(self, argv: list[str], timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, MAIL_CONFIG=str(self.conf_dir))
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if check and cp.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited {cp.returncode}\nstdout: {cp.stdout}\nstderr: {cp.stderr}\n"
                f"maillog tail:\n{self._log_tail()}"
            )
        return cp

    def postfix(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``postfix -c DIR ARGS``; return stdout+stderr; raise RuntimeError on failure."""
        cp = self._run([self.postfix_cmd, "-c", str(self.conf_dir), *args], timeout=timeout)
        return cp.stdout + cp.stderr

    def postconf(self, *args: str) -> str:
        """Run ``postconf -c DIR ARGS`` and return its stdout (e.g. ``postconf("-h", "relayhost")``)."""
        return self._run([self.postconf_cmd, "-c", str(self.conf_dir), *args]).stdout

    def reload(self) -> None:
        """``postfix reload`` after changing the files (e.g. with ``postconf("-e", ...)``)."""
        self.postfix("reload")

    # -- lifecycle
    def start(self, timeout: float = 30.0) -> Self:
        """Write the configuration, check it, start master and wait until smtpd answers 220."""
        if self.running():
            return self
        self.write_config()
        self.postfix("check")  # also creates missing queue directories with the right owners
        _LIVE_RIGS.add(self)
        try:
            self.postfix("start", timeout=timeout)
            self._master_pid = self._read_master_pid()
            self._wait_banner(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_banner(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((LOOPBACK, self.smtp_port), timeout=2.0) as s:
                    s.settimeout(max(0.5, min(5.0, deadline - time.monotonic())))
                    banner = s.recv(512)
                    if banner.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
                    last = RuntimeError(f"unexpected banner {banner!r}")
            except OSError as e:
                last = e
            time.sleep(_POLL)
        raise TimeoutError(
            f"Postfix smtpd on {LOOPBACK}:{self.smtp_port} gave no 220 banner within {timeout:g}s "
            f"(last: {last})\nmaillog tail:\n{self._log_tail()}"
        )

    def _read_master_pid(self) -> int | None:
        """The master PID from ``queue/pid/master.pid``, if that process is alive and of this instance."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if self._is_ours(pid) else None

    def _is_ours(self, pid: int) -> bool:
        """Whether process ``pid`` runs with ``MAIL_CONFIG`` = this rig's conf dir (master and daemons do)."""
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        return f"MAIL_CONFIG={self.conf_dir}".encode() in env

    def running(self) -> bool:
        """Whether this instance's master process is alive."""
        return self._read_master_pid() is not None

    def _processes(self) -> list[int]:
        """Live PIDs of this instance: ``MAIL_CONFIG`` = our conf dir, or in the master's process group.

        Zombies are left out: they are dead already, and reaping them is up to their parent
        (``init`` for master, which daemonizes).
        """
        mine: list[int] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            state, pgrp = stat[0], int(stat[2])
            if state in ("Z", "X"):
                continue
            if (self._master_pid is not None and pgrp == self._master_pid) or self._is_ours(pid):
                mine.append(pid)
        return mine

    def stop(self, timeout: float = 20.0) -> None:
        """Stop this instance; return once none of its processes is left.

        Does what ``postfix stop`` does (SIGTERM to the master named in ``pid/master.pid``)
        but polls for the exit instead of postfix-script's 1 s sleeps; if the master is
        still there halfway through ``timeout`` it runs ``postfix -c DIR stop``, and at the
        end SIGKILLs whatever of this instance is left. Never touches another instance.
        """
        self._master_pid = self._read_master_pid() or self._master_pid
        if self._master_pid is not None:
            try:
                os.kill(self._master_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        fallback_at = time.monotonic() + timeout / 2
        while (pids := self._processes()) and time.monotonic() < deadline:
            if fallback_at and time.monotonic() > fallback_at and self.running():
                fallback_at = 0.0
                self._run([self.postfix_cmd, "-c", str(self.conf_dir), "stop"], timeout=timeout, check=False)
            time.sleep(_POLL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_deadline = time.monotonic() + 5.0
        while (left := self._processes()) and time.monotonic() < kill_deadline:
            time.sleep(_POLL)
        self._master_pid = None
        _LIVE_RIGS.discard(self)
        if left:
            raise RuntimeError(f"Postfix processes of {self.conf_dir} survived SIGKILL: {left}")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- log
    def maillog(self) -> str:
        """The whole maillog so far."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """The current length of the maillog: pass it as ``since`` to :meth:`wait_log`."""
        return len(self.maillog())

    def _log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.maillog().splitlines()[-lines:])

    def wait_log(self, regex: str, timeout: float = 30.0, since: int = 0) -> re.Match[str]:
        """Poll the maillog (from character offset ``since``) until ``regex`` matches a line; return the match."""
        pattern = re.compile(regex, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.maillog(), since)
            if m:
                return m
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no maillog line matched {regex!r} within {timeout:g}s\nmaillog tail:\n{self._log_tail()}"
                )
            time.sleep(_POLL)

    # -- queue
    def flush(self) -> None:
        """``postqueue -f``: retry deferred mail now (also lifts the dead-destination throttle)."""
        self._run([self.postqueue_cmd, "-c", str(self.conf_dir), "-f"])

    def queue(self) -> str:
        """``postqueue -p`` output (``Mail queue is empty`` when empty)."""
        return self._run([self.postqueue_cmd, "-c", str(self.conf_dir), "-p"]).stdout

    def queue_empty(self) -> bool:
        """Whether no message is queued (``postqueue -j`` prints nothing)."""
        return not self._run([self.postqueue_cmd, "-c", str(self.conf_dir), "-j"]).stdout.strip()

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        """Poll until the queue is empty; raise TimeoutError with the queue listing."""
        deadline = time.monotonic() + timeout
        while not self.queue_empty():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Postfix queue not empty after {timeout:g}s:\n{self.queue()}")
            time.sleep(0.1)
