"""A throwaway OpenLDAP server (slapd) on 127.0.0.1 for the tests (Debian's slapd and ldap-utils).

Usage::

    with SlapdServer(tmp_path) as ldap:
        ldap.add('''
            dn: domainName=a.example,dc=example,dc=org
            objectClass: mailDomain
            domainName: a.example
            senderRelayHost: [relay.a.example]:587
        ''')
        ldap.url                      # ldap://127.0.0.1:PORT/
        ldap.bind_dn                  # cn=admin,dc=example,dc=org (the rootdn)
        ldap.bind_password            # random unless given

Debian's own slapd, configured or not, is never used: ``slapd`` runs in the
foreground (``-d none``: errors, start and stop only, into ``BASE/slapd.log``)
with its own ``BASE/slapd.conf`` (``-f``), listening on ``ldap://127.0.0.1:PORT/``
only (``-h``), in its own session. One ``mdb`` database holds the suffix
``dc=example,dc=org``, whose entry is created at the first start; the rootdn
``cn=admin,dc=example,dc=org`` has the password :attr:`SlapdServer.bind_password`.
Loaded schemas: core, cosine (which has ``mail``), inetorgperson and
:data:`TEST_SCHEMA`, just enough of iRedMail's schema for the relay-map tests.

Access: ``userPassword`` is only usable to bind; everything else is readable by
anyone, or, with ``anonymous_read=False`` (iRedMail's way), by bound users only
(anonymous searches then find nothing).

slapd runs as the user running the tests (no ``-u``; root under ``make test``):
all its files live under ``base`` (typically a pytest ``tmp_path``, whose
parents are 0700), which a dropped-privilege ``openldap`` process could not
reach. Layout under ``base``: ``slapd.conf``, ``mjfilter-test.schema``,
``data/`` (the mdb files), ``slapd.pid``, ``slapd.args``, ``slapd.log``.

``stop()`` sends SIGTERM and waits (bounded), then SIGKILLs the server's process
group; ``start()`` afterwards brings the same data back on the same port.
Leaving the ``with`` block stops the server (the files stay under ``base``). An
``atexit`` hook stops any server a test left running.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Self

from rig import LOOPBACK, free_port, stop_server

SUFFIX = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{SUFFIX}"
_POLL = 0.05
_SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")

# A test schema only: private OIDs under 1.3.6.1.4.1.99999 (an arc nobody was
# given), names as in iRedMail's schema. Never load it into a real directory.
# ``mail`` is not defined here: cosine.schema has it.
TEST_SCHEMA = """\
# mjfilter test schema: a tiny stand-in for iRedMail's mailUser/mailDomain.
# Private test OIDs (1.3.6.1.4.1.99999.*), not registered: for tests only.
attributetype ( 1.3.6.1.4.1.99999.1.1.1 NAME 'domainName'
    DESC 'mail domain name'
    EQUALITY caseIgnoreMatch
    SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15{255}
    SINGLE-VALUE )

attributetype ( 1.3.6.1.4.1.99999.1.1.2 NAME 'senderRelayHost'
    DESC 'sender dependent relay host, e.g. [smtp.example.com]:587'
    EQUALITY caseIgnoreMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15{255} )

objectclass ( 1.3.6.1.4.1.99999.1.2.1 NAME 'mailDomain'
    DESC 'a mail domain'
    SUP top STRUCTURAL
    MUST domainName
    MAY ( senderRelayHost $ cn $ description ) )

objectclass ( 1.3.6.1.4.1.99999.1.2.2 NAME 'mailUser'
    DESC 'a mail user (auxiliary to inetOrgPerson)'
    SUP top AUXILIARY
    MUST mail
    MAY ( senderRelayHost $ userPassword ) )
"""

_LIVE: set[SlapdServer] = set()  # strong references: a forgotten server is still stopped at exit


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_LIVE):
        try:
            server.stop()
        except Exception as e:  # noqa: BLE001 - best effort at exit
            print(f"ldap_rig: could not stop slapd under {server.base}: {e}", file=sys.stderr)


def _find(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def slapd_path() -> str | None:
    return _find("slapd")


class SlapdServer:
    """A private slapd under ``base`` on 127.0.0.1:``port`` (chosen free unless given).

    Attributes: ``base``, ``port``, ``suffix``, ``bind_dn`` (the rootdn),
    ``bind_password``, ``log_path``; :attr:`url`.
    """

    def __init__(self, base: Path, port: int | None = None, password: str | None = None,
                 anonymous_read: bool = True) -> None:
        slapd = slapd_path()
        tools = {name: _find(name) for name in ("ldapadd", "ldapmodify", "ldapwhoami")}
        if slapd is None or None in tools.values() or not Path("/etc/ldap/schema/core.schema").is_file():
            raise RuntimeError("slapd, ldap-utils or the OpenLDAP schemas are not installed: "
                               "run make test, which installs slapd and ldap-utils")
        self._slapd = slapd
        self._ldapadd, self._ldapmodify, self._ldapwhoami = (str(tools[n]) for n in ("ldapadd", "ldapmodify",
                                                                                      "ldapwhoami"))
        self.base = Path(base).resolve()
        self.port = port or free_port()
        self.suffix = SUFFIX
        self.bind_dn = ROOT_DN
        self.bind_password = password or secrets.token_urlsafe(18)
        self.anonymous_read = anonymous_read
        self.log_path = self.base / "slapd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ldap://{LOOPBACK}:{self.port}/"

    @property
    def conf_path(self) -> Path:
        return self.base / "slapd.conf"

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    # -- configuration
    def _write_config(self) -> None:
        schema = self.base / "mjfilter-test.schema"
        schema.write_text(TEST_SCHEMA)
        readers = "by * read" if self.anonymous_read else "by users read by * none"
        conf = textwrap.dedent(f"""\
            # Written by tests/ldap_rig.py: a throwaway test directory.
            include /etc/ldap/schema/core.schema
            include /etc/ldap/schema/cosine.schema
            include /etc/ldap/schema/inetorgperson.schema
            include {schema}
            pidfile {self.base / "slapd.pid"}
            argsfile {self.base / "slapd.args"}
            modulepath /usr/lib/ldap
            moduleload back_mdb
            sizelimit 500

            database mdb
            maxsize 33554432
            suffix "{self.suffix}"
            rootdn "{self.bind_dn}"
            rootpw {self.bind_password}
            directory {self.data_dir}
            index objectClass eq
            index mail,domainName eq
            access to attrs=userPassword by self write by anonymous auth by * none
            access to * {readers}
            """)
        fd = os.open(self.conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds rootpw
        with os.fdopen(fd, "w") as f:
            f.write(conf)

    # -- lifecycle
    def start(self, timeout: float = 15.0) -> Self:
        """Write the configuration (first time), start slapd, wait until it answers a bind."""
        if self.running():
            return self
        self.base.mkdir(parents=True, exist_ok=True)
        fresh = not self.data_dir.exists()
        if fresh:
            self.data_dir.mkdir(mode=0o700)
        self._write_config()
        _LIVE.add(self)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self._slapd, "-f", str(self.conf_path), "-h", self.url, "-d", "none"],
                cwd=self.base, env=_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        try:
            self._wait_ready(timeout)
            if fresh:
                self.add(f"""
                    dn: {self.suffix}
                    objectClass: dcObject
                    objectClass: organization
                    dc: example
                    o: mjfilter tests
                    """)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Poll with a rootdn bind (ldapwhoami) until slapd answers, with a deadline."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited {self.proc.returncode} at start\nlog tail:\n{self.log_tail()}")
            try:
                cp = self._client(self._ldapwhoami, "", nettimeout=1, timeout=5)
                if cp.returncode == 0:
                    return
                last = cp.stderr.decode(errors="replace").strip()
            except subprocess.TimeoutExpired:
                last = "ldapwhoami timed out"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"slapd on {self.url} not ready after {timeout:g}s (last: {last})\n"
                                   f"log tail:\n{self.log_tail()}")
            time.sleep(_POLL)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout``; then SIGKILL to the server's process group."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is not None:
            stop_server(proc, "slapd", [(signal.SIGTERM, timeout)])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- data
    def add(self, ldif: str) -> None:
        """Add the entries of ``ldif`` (common indentation removed) as the rootdn, with ldapadd."""
        self._ldif(self._ldapadd, ldif)

    def modify(self, ldif: str) -> None:
        """Apply ``ldif`` (changetype records, common indentation removed) as the rootdn, with ldapmodify."""
        self._ldif(self._ldapmodify, ldif)

    def _ldif(self, tool: str, ldif: str) -> None:
        text = textwrap.dedent(ldif).strip() + "\n"
        cp = self._client(tool, text, nettimeout=5, timeout=30)
        if cp.returncode != 0:
            raise RuntimeError(f"{Path(tool).name} exited {cp.returncode}: "
                               f"{cp.stderr.decode(errors='replace').strip()}\nLDIF:\n{text}")

    def _client(self, tool: str, stdin: str, nettimeout: int, timeout: float) -> subprocess.CompletedProcess[bytes]:
        """Run an ldap-utils tool bound as the rootdn; the password goes through a 0600 file (-y)."""
        fd, pwfile = tempfile.mkstemp(prefix="rootpw-", dir=self.base)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.bind_password)  # -y takes the whole file: no newline
            argv = [tool, "-x", "-H", self.url, "-o", f"nettimeout={nettimeout}", "-D", self.bind_dn, "-y", pwfile]
            return subprocess.run(argv, input=stdin.encode(), capture_output=True, env=_env(), timeout=timeout,
                                  check=False)
        finally:
            os.unlink(pwfile)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _env() -> dict[str, str]:
    # LDAPNOINIT: ignore /etc/ldap/ldap.conf and ~/.ldaprc in the client tools.
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC", "LDAPNOINIT": "1"}
