"""The state contract and its backends.

The store keeps what must survive a restart or be shared between nodes:

- small key/value state (generated secrets);
- **reservations** (campaign dedup): a key held by one *holder* (a message
  fingerprint), claimed atomically, released by compare-and-delete;
- **suppression lists** (unsubscribe, bounce): addresses or domains, each with
  an optional SMTP code and reason, plus hard-bounce counts;
- **campaign counters** and the **event log**.

``open_store(url)`` picks the backend: ``sqlite:///PATH`` (embedded, default)
or ``redis://HOST:PORT/DB`` (several nodes share one state). Both pass the
same contract tests (``tests/test_store.py``).

Every method raises ``StoreUnavailable`` when the store cannot answer within
its timeout (down, locked, disk full); the engine turns that into 451 4.3.0,
never 5xx, never a silent skip. All methods are safe to call from several
threads at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit

LISTS = ("unsubscribe", "bounce")

# What ``Store.reserve`` says of each key. CLAIMED and HELD are true, TAKEN false.
TAKEN = 0  # another holder has the key
CLAIMED = 1  # the key was free (or expired) and is now this holder's
HELD = 2  # the key already was this holder's (the same message again)


class StoreUnavailable(Exception):
    """The store did not answer (down, locked past its timeout, disk full)."""


@dataclass(frozen=True, slots=True)
class SuppressionEntry:
    """One suppressed address (``user@domain``) or domain (``@domain``)."""

    list: str
    entry: str  # lowercased "user@domain" or "@domain"
    code: int | None = None  # SMTP code to reject with when it was the only recipient
    reason: str | None = None
    added: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {"list": self.list, "entry": self.entry, "code": self.code, "reason": self.reason,
                "added": self.added}


@dataclass(frozen=True, slots=True)
class CampaignStats:
    tenant: str
    campaign: str
    messages: int = 0
    delivered: int = 0
    blocked: int = 0
    first_seen: float | None = None
    last_seen: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "campaign": self.campaign, "messages": self.messages,
                "delivered": self.delivered, "blocked": self.blocked,
                "first_seen": self.first_seen, "last_seen": self.last_seen}


def normalize_entry(entry: str) -> str:
    """``User@Example.ORG`` -> ``user@example.org``; ``example.org`` or ``@Example.org`` -> ``@example.org``."""
    e = entry.strip().lower()
    if not e or any(c.isspace() for c in e) or e.count("@") > 1 or e.endswith("@"):
        raise ValueError(f"{entry!r} is not an address or a domain")
    return e if "@" in e else "@" + e


def mask_url(url: str) -> str:
    """``url`` with its password (userinfo or ``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}:***@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(k.lower() == "password" for k, _ in pairs):
                query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
        masked = f"{parts.scheme}://{netloc}{parts.path}"
        return masked + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    except ValueError:
        return "<unparsable url>"


def lookup_keys(address: str) -> tuple[str, str]:
    """The entries that suppress ``address``: itself and its domain (both lowercased)."""
    a = address.strip().lower()
    return (a, "@" + a.rpartition("@")[2])


class Store(Protocol):
    url: str

    # -- key/value -------------------------------------------------------------
    def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""

    def get(self, key: str) -> str | None:
        """The value kept under ``key``, or None."""

    def put(self, key: str, value: str) -> None:
        """Keep ``value`` under ``key`` (replacing any previous value)."""

    def put_if_absent(self, key: str, value: str) -> str:
        """Keep ``value`` under ``key`` unless a value is there; return the value kept."""

    # -- reservations ----------------------------------------------------------------
    def reserve(self, keys: Sequence[str], holder: str, ttl: float | None = None) -> list[int]:
        """Claim every key for ``holder``, atomically, in one round-trip.

        For each key, in order: ``CLAIMED`` when it was free or expired and is
        now ``holder``'s, ``HELD`` when it already was ``holder``'s (a retry of
        the same message: never a duplicate), ``TAKEN`` when another holder has
        it. CLAIMED and HELD are true, TAKEN is false. A caller that undoes its
        work releases only what it CLAIMED: a HELD key belongs to an earlier
        attempt that may have been delivered. ``ttl`` seconds (None: forever)
        applies to newly claimed keys.
        """

    def release(self, keys: Sequence[str], holder: str) -> int:
        """Free the keys still held by ``holder`` (compare-and-delete); return how many."""

    def holder(self, key: str) -> str | None:
        """Who holds ``key`` now (None when free or expired)."""

    # -- suppression --------------------------------------------------------------------
    def suppress_add(self, entries: Iterable[SuppressionEntry]) -> int:
        """Add or replace entries (``entry`` already normalised); return how many."""

    def suppress_remove(self, list_name: str, entry: str) -> bool:
        """Remove one entry; True when it was there."""

    def suppressed(self, list_name: str, addresses: Sequence[str]) -> dict[str, SuppressionEntry]:
        """For each address suppressed on ``list_name`` (by itself or its domain), its entry.

        The address entry wins over the domain entry. One round-trip.
        """

    def suppress_entries(self, list_name: str | None = None) -> list[SuppressionEntry]:
        """Every entry of one list (or of all lists), sorted by list and entry."""

    def record_bounce(self, address: str) -> int:
        """Count one more permanent bounce for ``address``; return its total."""

    # -- campaigns and events -------------------------------------------------------------
    def campaign_add(self, tenant: str, campaign: str, messages: int = 0, delivered: int = 0,
                     blocked: int = 0) -> None:
        """Add to a campaign's counters (first/last seen kept by the store)."""

    def campaigns(self) -> list[CampaignStats]:
        """Every campaign's counters, most recently seen first."""

    def add_events(self, events: Sequence[dict[str, Any]]) -> None:
        """Append events (JSON-ready dicts) to the event log."""

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent events, oldest first."""

    # -- maintenance --------------------------------------------------------------------
    def check(self) -> dict[str, object]:
        """Integrity and size report for ``mjfilter store check`` (``ok`` True/False)."""

    def close(self) -> None: ...


def open_store(url: str, timeout: float = 5.0, base: Path | None = None, prefix: str = "mjfilter:",
               keep_events: int = 100000) -> Store:
    """Open the backend ``url`` names; relative SQLite paths are taken from ``base``."""
    if url.startswith("sqlite:///"):
        from .sqlite import SQLiteStore

        path = Path(url[len("sqlite:///"):])
        if not path.is_absolute() and base is not None:
            path = base / path
        return SQLiteStore(path, timeout=timeout, keep_events=keep_events)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisStore

        return RedisStore(url, timeout=timeout, prefix=prefix, keep_events=keep_events)
    raise ValueError(f"unknown store url {url!r}")


__all__ = ["CLAIMED", "HELD", "LISTS", "TAKEN", "CampaignStats", "Store", "StoreUnavailable", "SuppressionEntry", "lookup_keys", "mask_url",
           "normalize_entry", "open_store"]
