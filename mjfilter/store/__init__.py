"""The state contract and its backends.

The store keeps what must survive a restart or be shared between nodes: small
key/value state (generated secrets), and, as features arrive, reservations,
suppression lists and events. ``open_store(url)`` picks the backend:
``sqlite:///PATH`` (embedded, default) or ``redis://`` (several nodes).

Every backend raises ``StoreUnavailable`` when it cannot answer within its
timeout; the engine turns that into 451 4.3.0, never 5xx, never a silent skip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class StoreUnavailable(Exception):
    """The store did not answer (down, locked past its timeout, disk full)."""


class Store(Protocol):
    url: str

    def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""

    def get(self, key: str) -> str | None:
        """The value kept under ``key``, or None."""

    def put(self, key: str, value: str) -> None:
        """Keep ``value`` under ``key`` (replacing any previous value)."""

    def put_if_absent(self, key: str, value: str) -> str:
        """Keep ``value`` under ``key`` unless a value is there; return the value kept."""

    def check(self) -> dict[str, object]:
        """Integrity and size report for ``mjfilter store check``."""

    def close(self) -> None: ...


def open_store(url: str, timeout: float = 5.0, base: Path | None = None) -> Store:
    """Open the backend ``url`` names; relative SQLite paths are taken from ``base``."""
    if url.startswith("sqlite:///"):
        from .sqlite import SQLiteStore

        path = Path(url[len("sqlite:///"):])
        if not path.is_absolute() and base is not None:
            path = base / path
        return SQLiteStore(path, timeout=timeout)
    if url.startswith(("redis://", "rediss://")):
        raise StoreUnavailable("the redis backend is not available in this version")
    raise ValueError(f"unknown store url {url!r}")


__all__ = ["Store", "StoreUnavailable", "open_store"]
