"""Postfix map source files, read directly.

The text files an administrator feeds to ``postmap`` (``/etc/postfix/sender_relay``,
``/etc/postfix/sasl_passwd``): one ``KEY VALUE`` per logical line, ``#`` comment
lines, blank lines ignored, a line that starts with whitespace continues the
previous one. Keys are matched case-insensitively (Postfix folds them to lower
case); the first occurrence of a key wins, as with ``postmap``.

The file is read again when its modification time or size changes (checked at
most once a second), so editing it takes effect without a reload, as a
``postmap`` run does for Postfix. A file that becomes unreadable keeps its last
good contents and the problem is logged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("mjfilter.routing")


class MapFileError(Exception):
    """A map file that cannot be used; ``str()`` is ``file:line: reason``."""


def parse_map(text: str, filename: str) -> dict[str, str]:
    """``KEY VALUE`` lines -> {lowercased key: value}; raise ``MapFileError`` with file:line."""
    entries: dict[str, str] = {}
    logical: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if not logical:
                raise MapFileError(f"{filename}:{n}: continuation line without a line before it")
            start, prev = logical[-1]
            logical[-1] = (start, prev + " " + stripped)
        else:
            logical.append((n, stripped))
    for n, line in logical:
        parts = line.split(None, 1)
        if len(parts) < 2:
            raise MapFileError(f"{filename}:{n}: expected format: KEY whitespace VALUE")
        entries.setdefault(parts[0].lower(), parts[1].strip())
    return entries


class MapFile:
    """One map source file, re-read when it changes."""

    def __init__(self, path: Path, check_interval: float = 1.0) -> None:
        self.path = path
        self._interval = check_interval
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.entries: dict[str, str] = {}
        self._load(strict=True)

    def _load(self, strict: bool) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            entries = parse_map(self.path.read_text(encoding="utf-8", errors="surrogateescape"), str(self.path))
        except (OSError, MapFileError) as e:
            if strict:
                raise MapFileError(str(e) if isinstance(e, MapFileError) else f"{self.path}: {e.strerror or e}") from None
            log.error("map file %s: %s (keeping its last good contents)", self.path, e)
            self._stamp = None
            return
        self.entries, self._stamp = entries, stamp

    def get(self, key: str) -> str | None:
        now = time.monotonic()
        if now - self._checked >= self._interval:
            with self._lock:
                if now - self._checked >= self._interval:
                    self._checked = now
                    self._load(strict=False)
        return self.entries.get(key.lower())
