"""Shared pieces of the dialect parsers: the result type and small value checks.

A dialect's ``parse`` gets only its own headers, already unfolded, stripped and
decoded, as ``(name as received, value)`` pairs in message order, and returns a
``DialectResult``. Everything here is a pure function of its arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mjfilter.directives import Problem

EXCERPT_MAX = 80
MASK = "***"
REPEATED = "repeated header, first value used"

# Boolean spellings accepted wherever a vendor says "true|false" (compared lowercased).
TRUE_WORDS = frozenset({"true", "yes", "1"})
FALSE_WORDS = frozenset({"false", "no", "0"})

Header = tuple[str, str]


@dataclass(slots=True)
class DialectResult:
    """What one dialect read from its headers.

    ``values`` maps ``Directives`` field names to values (only the fields the
    headers actually set), ``sources`` maps each of those fields to the header
    name as received, ``problems`` lists the unusable values.
    """

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def set(self, name: str, value: Any, header: str) -> None:
        """Set the ``Directives`` field ``name`` from ``header``."""
        self.values[name] = value
        self.sources[name] = header

    def unset(self, name: str) -> None:
        self.values.pop(name, None)
        self.sources.pop(name, None)

    def problem(self, header: str, value: str, reason: str) -> None:
        """Record an unusable value (the value is shortened, masked when secret)."""
        self.problems.append(make_problem(header, value, reason))


def is_secret(name: str) -> bool:
    """A header whose value is a credential and must never be shown."""
    return "password" in name.lower()


def excerpt(name: str, value: str) -> str:
    """``value`` for a Problem: CR, LF and NUL removed, at most 80 characters, credentials masked."""
    if is_secret(name):
        return MASK
    if "\r" in value or "\n" in value or "\0" in value:
        value = value.replace("\r", "").replace("\n", "").replace("\0", "")
    if len(value) > EXCERPT_MAX:
        value = value[: EXCERPT_MAX - 3] + "..."
    return value


def make_problem(header: str, value: str, reason: str) -> Problem:
    return Problem(header=header, value=excerpt(header, value), reason=reason)


def first_instances(
    headers: Iterable[Header],
    result: DialectResult,
    multi: frozenset[str] = frozenset(),
    repeat_reasons: Mapping[str, str] | None = None,
) -> dict[str, Header]:
    """The first ``(name, value)`` of each single-valued header, keyed by lowercase name.

    The first instance counts; each later instance with a different value is
    recorded as a Problem (``repeat_reasons`` may give a header its own reason).
    Names in ``multi`` (lowercase) add up and are left out here.
    """
    first: dict[str, Header] = {}
    for name, value in headers:
        lname = name.lower()
        if lname in multi:
            continue
        seen = first.get(lname)
        if seen is None:
            first[lname] = (name, value)
        elif value != seen[1]:
            reason = (repeat_reasons or {}).get(lname, REPEATED)
            result.problem(name, value, reason)
    return first


def parse_bool(value: str, true_words: frozenset[str] = TRUE_WORDS,
               false_words: frozenset[str] = FALSE_WORDS) -> bool | None:
    """``True``/``False`` for an accepted spelling (any case), ``None`` otherwise."""
    word = value.lower()
    if word in true_words:
        return True
    if word in false_words:
        return False
    return None


def bool_reason(true_words: frozenset[str] = TRUE_WORDS, false_words: frozenset[str] = FALSE_WORDS) -> str:
    """The Problem reason for a value that is none of the accepted spellings."""
    return f"not a boolean (use {'|'.join(sorted(true_words))} or {'|'.join(sorted(false_words))})"


def parse_uint(value: str, max_digits: int = 18) -> int | None:
    """A non-negative decimal integer (ASCII digits only, no sign), or ``None``."""
    if not value or len(value) > max_digits or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


def split_tags(value: str) -> list[str]:
    """Comma-separated tags: white space stripped, empty parts dropped."""
    return [t for t in (part.strip() for part in value.split(",")) if t]


def unique(items: Iterable[str]) -> tuple[str, ...]:
    """``items`` in order, duplicates removed."""
    return tuple(dict.fromkeys(items))
