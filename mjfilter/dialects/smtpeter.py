"""SMTPeter feature headers: ``x-smtpeter-*``.

``x-smtpeter-inlinecss``, ``-trackclicks``, ``-trackopens`` and
``-trackbounces`` switch a feature on or off for one message, overriding the
login's feature set. Values are ``true``/``false`` in any case (``1``/``0``
and ``yes``/``no`` are accepted too). Any other ``x-smtpeter-*`` header is
ignored here (it is still stripped before queueing).
"""

from __future__ import annotations

from types import MappingProxyType

from ._base import DialectResult, Header, bool_reason, first_instances, parse_bool

NAME = "smtpeter"
PREFIXES: tuple[str, ...] = ("x-smtpeter-",)
ENCODED_WORDS: frozenset[str] = frozenset()

# lowercase header name -> Directives field
FIELDS: MappingProxyType[str, str] = MappingProxyType({
    "x-smtpeter-inlinecss": "inline_css",
    "x-smtpeter-trackclicks": "track_click",
    "x-smtpeter-trackopens": "track_open",
    "x-smtpeter-trackbounces": "track_bounces",
})


def parse(headers: list[Header]) -> DialectResult:
    """Read SMTPeter's headers (this dialect's only, unfolded and decoded, in message order)."""
    result = DialectResult()
    for lname, (name, value) in first_instances(headers, result).items():
        field = FIELDS.get(lname)
        if field is None:
            continue
        flag = parse_bool(value)
        if flag is None:
            result.problem(name, value, bool_reason())
        else:
            result.set(field, flag, name)
    return result
