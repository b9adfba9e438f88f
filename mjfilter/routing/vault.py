"""Per-message smarthost credentials, kept for Postfix's SASL lookups.

A message with ``x-mq-smarthost-username``/``-password`` leaves Postfix through
the per-message transport, whose ``smtp_sasl_password_maps`` is mjfilter's
socketmap table ``mqsasl``. Postfix looks credentials up when it delivers (maybe
days later, after retries), by the envelope sender first, then by the next hop
``[host]:port``. So at receipt mjfilter keeps, in the store, one record per
sender and one per next hop:

- the record holds the next hop, whether to authenticate, and the credentials
  encrypted (Fernet) with a key kept in the state directory (``routing.key``,
  mode 0600). The store never sees a password in clear, and an event, a log line
  or a queued header never sees it at all;
- when a second message gives the same sender another smarthost host or
  username (or the same next hop another username) while the first record is
  still live, the record turns into a conflict marker: a sender conflict
  answers NOTFOUND (Postfix then asks by next hop), a next-hop conflict answers
  TEMP (Postfix defers). Credentials are therefore never handed to a host they
  were not given for, and never used for another message's account. A new
  password for the same host and username replaces the old one (a rotated
  password; the old one is likely revoked). Sender records compare the host
  name the header gave, not the pinned address, so a name with rotating
  addresses does not conflict with itself;
- records expire after ``per_message.credential_ttl`` (Postfix's
  ``maximal_queue_lifetime``, 5 days).

The password header itself never reaches Postfix's queue file or log either (a
milter's header delete leaves the original bytes in the queue file; a
header_checks REPLACE logs the original line). So cleanup's ``header_checks``
hand ``Received``, ``x-mq-smarthost-username`` and ``x-mq-smarthost-password``
lines to the socketmap table ``credential`` (``Intake``): per cleanup process
(one socketmap connection each, one message at a time, the first header of a
message is its ``Received`` line) the username and password go here under one
random token; the password line is dropped (``IGNORE``, which Postfix does not
log) and the username line becomes ``x-mq-smarthost-username-ref: TOKEN``; the
milter redeems the token.

The key file is per host, which suits the design: the Postfix that queued the
message asks the mjfilter beside it. With a Redis store shared by several
hosts, each host keeps its records under its own key prefix (derived from its
key), so hosts neither read nor conflict with each other's records.

Tokens are single use: the milter's redeem voids them, and header_checks drop a
``x-mq-smarthost-username-ref`` header a client sends itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import string
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

KEY_FILE = "routing.key"
SENDER = "mqsasl:s:"
NEXTHOP = "mqsasl:d:"
TOKEN = "mqsasl:t:"
TOKEN_TTL = 3600.0  # a token is redeemed by the milter seconds after cleanup made it
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "-_")  # secrets.token_urlsafe's alphabet


@dataclass(frozen=True, slots=True)
class Found:
    """What the vault says for a key: ``credentials`` ("user:password") or None (no AUTH),
    ``conflict`` when two different records met, ``missing`` when nothing is kept."""

    credentials: str | None = None
    conflict: bool = False
    missing: bool = False


class Vault:
    def __init__(self, state_dir: Path, ttl: float) -> None:
        self.state_dir = Path(state_dir)
        self.ttl = ttl
        self._fernet: Fernet | None = None
        self._mac_key = b""
        self._host_id = ""

    # -- the key -----------------------------------------------------------------------
    def _cipher(self) -> Fernet:
        if self._fernet is None:
            path = self.state_dir / KEY_FILE
            try:
                key = path.read_bytes().strip()
            except FileNotFoundError:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                key = Fernet.generate_key()
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:  # another process made it first
                    key = path.read_bytes().strip()
                else:
                    with os.fdopen(fd, "wb") as f:
                        f.write(key + b"\n")
            self._fernet = Fernet(key)
            self._mac_key = hashlib.sha256(b"mjfilter-vault-mac" + key).digest()
            self._host_id = hashlib.sha256(b"mjfilter-vault-host" + key).hexdigest()[:12]
        return self._fernet

    def _fingerprint(self, *parts: str) -> str:
        self._cipher()
        msg = "\0".join(parts).encode("utf-8", "surrogateescape")
        return hmac.new(self._mac_key, msg, hashlib.sha256).hexdigest()[:32]

    def _key(self, prefix: str, name: str) -> str:
        self._cipher()
        return f"{prefix}{self._host_id}:{name.lower()}"

    # -- writing --------------------------------------------------------------------------
    def remember(self, store: Any, sender: str, nexthop: str, host: str, credentials: str | None) -> None:
        """Keep ``credentials`` (``user:password``, or None: no AUTH) for ``sender`` and ``nexthop``.

        ``host`` is the smarthost as the message named it (``name:port``); ``nexthop``
        the pinned ``[address]:port`` Postfix connects to.
        """
        now = time.time()
        token = self._cipher().encrypt(credentials.encode("utf-8", "surrogateescape")).decode() if credentials else None
        user = credentials.partition(":")[0] if credentials else ""
        by_nexthop = {"f": self._fingerprint(user), "c": token, "e": now + self.ttl}
        self._merge(store, self._key(NEXTHOP, nexthop), by_nexthop, now)
        if sender:
            by_sender = {"f": self._fingerprint(host.lower(), user), "c": token, "e": now + self.ttl}
            self._merge(store, self._key(SENDER, sender), by_sender, now)

    def _merge(self, store: Any, key: str, record: dict[str, Any], now: float) -> None:
        raw = json.dumps(record, separators=(",", ":"))
        kept = store.put_if_absent(key, raw)
        if kept == raw:
            return
        old = _decode(kept)
        if old is None or old.get("e", 0) <= now:
            store.put(key, raw)  # expired or unreadable: replace
        elif old.get("x"):
            store.put(key, json.dumps({"x": 1, "e": max(old["e"], record["e"])}))
        elif old.get("f") == record["f"]:
            store.put(key, raw)  # the same smarthost and user: refresh (and take a rotated password)
        else:
            store.put(key, json.dumps({"x": 1, "e": max(old["e"], record["e"])}))

    # -- header tokens (cleanup's header_checks -> socketmap -> milter) ----------------------
    def new_token(self) -> str:
        return secrets.token_urlsafe(24)

    def deposit(self, store: Any, token: str, part: str, value: str) -> None:
        """Add ``part`` ("u" username, "p" password) under ``token`` (encrypted)."""
        key = self._key(TOKEN, token)
        rec = _decode(store.get(key)) or {}
        rec[part] = self._cipher().encrypt(value.encode("utf-8", "surrogateescape")).decode()
        rec["e"] = time.time() + TOKEN_TTL
        store.put(key, json.dumps(rec, separators=(",", ":")))

    def redeem(self, store: Any, token: str) -> tuple[str | None, str | None] | None:
        """(username, password) kept under ``token``; None when unknown or expired."""
        if not token or any(c not in _TOKEN_CHARS for c in token):
            return None
        key = self._key(TOKEN, token)
        rec = _decode(store.get(key))
        if rec is None or rec.get("e", 0) <= time.time():
            return None
        store.put(key, '{"e":0}')  # single use: a replayed token finds nothing
        try:
            u, p = (self._cipher().decrypt(rec[k].encode()).decode("utf-8", "surrogateescape") if rec.get(k) else None
                    for k in ("u", "p"))
        except InvalidToken:
            return None
        return u, p

    # -- reading ----------------------------------------------------------------------------
    def find(self, store: Any, key: str) -> Found:
        """The record for a sender (``user@domain``) or a next hop (``[host]:port``)."""
        prefix = SENDER if "@" in key and not key.startswith("[") else NEXTHOP
        rec = _decode(store.get(self._key(prefix, key)))
        if rec is None or rec.get("e", 0) <= time.time():
            return Found(missing=True)
        if rec.get("x"):
            return Found(conflict=True)
        token = rec.get("c")
        if not token:
            return Found()
        try:
            return Found(self._cipher().decrypt(token.encode()).decode("utf-8", "surrogateescape"))
        except InvalidToken:  # another host's key, or a replaced key file
            return Found(missing=True)


def _decode(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Intake:
    """The ``credential`` table: credential headers of the message each cleanup process reads."""

    HEADER = re.compile(r"^(received|x-mq-smarthost-username(?:-ref)?|x-mq-smarthost-password)[ \t]*:[ \t]*(.*)$",
                        re.IGNORECASE | re.DOTALL)
    MAX_AGE = 60.0  # a message's headers reach cleanup within seconds; older state is stale

    def __init__(self) -> None:
        self._open: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def header(self, vault: Vault, store: Any, conn: int, line: str) -> str | None:
        """The header_checks action for ``line`` (None: no action)."""
        m = self.HEADER.match(line)
        if not m:
            return None
        name = m.group(1).lower()
        if name == "x-mq-smarthost-username-ref":
            return "IGNORE"  # only mjfilter makes these: a client's own is a replay attempt
        now = time.monotonic()
        with self._lock:
            if name == "received":  # a new message in this cleanup process
                self._open.pop(conn, None)
                return None
            token, t0 = self._open.get(conn, ("", 0.0))
            if not token or now - t0 > self.MAX_AGE:
                token = vault.new_token()
                self._open[conn] = (token, now)
            if len(self._open) > 1024:
                for c, (_, t) in list(self._open.items()):
                    if now - t > self.MAX_AGE:
                        del self._open[c]
        value = re.sub(r"\r?\n[ \t]*", " ", m.group(2)).strip()
        if name == "x-mq-smarthost-password":
            vault.deposit(store, token, "p", value)
            return "IGNORE"
        vault.deposit(store, token, "u", value)
        return f"REPLACE x-mq-smarthost-username-ref: {token}"
