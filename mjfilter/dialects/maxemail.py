"""Maxemail transactional SMTP headers: ``X-Mxm-*``.

``X-Mxm-Flags`` is a decimal bit mask: 1 open tracking, 2 click tracking,
4 check the master unsubscribe list, 8 ignore the master bounce list. Only the
first ``X-Mxm-Flags`` counts; a valid one sets all four fields (a clear bit is
an explicit "off"). A mask with bits above 8 keeps its known bits and records
a Problem about the unknown ones. ``X-Mxm-Tag`` is comma-separated, white
space stripped; several headers add up. Any other ``X-Mxm-*`` header is
ignored here (it is still stripped before queueing).
"""

from __future__ import annotations

from types import MappingProxyType

from ._base import DialectResult, Header, first_instances, parse_uint, split_tags, unique

NAME = "maxemail"
PREFIXES: tuple[str, ...] = ("x-mxm-",)
ENCODED_WORDS: frozenset[str] = frozenset()

FLAGS = "x-mxm-flags"
TAG = "x-mxm-tag"
# bit -> Directives field
BITS: MappingProxyType[int, str] = MappingProxyType({
    1: "track_open",
    2: "track_click",
    4: "check_unsubscribe",
    8: "ignore_bounce_list",
})
KNOWN_BITS = 15
ONLY_FIRST = "only the first X-Mxm-Flags counts"


def parse(headers: list[Header]) -> DialectResult:
    """Read Maxemail's headers (this dialect's only, unfolded and decoded, in message order)."""
    result = DialectResult()
    first = first_instances(headers, result, multi=frozenset({TAG}), repeat_reasons={FLAGS: ONLY_FIRST})
    tags = [t for name, value in headers if name.lower() == TAG for t in split_tags(value)]
    if tags:
        result.set("tags", unique(tags), next(n for n, _ in headers if n.lower() == TAG))
    if FLAGS in first:
        _flags(result, *first[FLAGS])
    return result


def _flags(result: DialectResult, name: str, value: str) -> None:
    mask = parse_uint(value)
    if mask is None:
        reason = "number too large" if value.isascii() and value.isdigit() else "not a non-negative decimal integer"
        result.problem(name, value, reason)
        return
    if mask & ~KNOWN_BITS:
        result.problem(name, value, f"unknown bits {mask & ~KNOWN_BITS} ignored (known: 1, 2, 4, 8)")
    for bit, field in BITS.items():
        result.set(field, bool(mask & bit), name)
