"""Vendor dialects: control headers -> one ``Directives`` value.

Each vendor module (``mailjet``, ``smtpeter``, ``mailerq``, ``maxemail``)
exposes ``NAME``, ``PREFIXES`` (lowercase name prefixes), ``ENCODED_WORDS``
(lowercase names whose RFC 2047 encoded words are decoded) and a pure
``parse(headers) -> DialectResult``. ``parse_directives`` is the only entry
point the engine uses: one pass over the message's headers, other headers
skipped with a cheap prefix test, each dialect given only its own headers
(unfolded, stripped, decoded, in message order), then the results merged.

Precedence
----------
Several vendors can ask for the same thing (open/click tracking: Mailjet,
SMTPeter and Maxemail; CSS inlining: SMTPeter and MailerQ). When two dialects
set the same scalar field to different values, the dialect earlier in
``PRECEDENCE`` wins:

    mailjet > smtpeter > mailerq > maxemail

Why this order: a dedicated, per-feature header is a more deliberate request
than a catch-all one. Mailjet and SMTPeter have one header per feature
(``X-Mailjet-TrackOpen: 0`` says exactly one thing), Mailjet's being the
family mjfilter is built around; MailerQ's ``x-mq-inlinecss`` is one of many
pass-through properties; Maxemail's ``X-Mxm-Flags`` sets four switches at once
from one number, so each of its bits is the least specific statement of all.

Nothing is silently ignored: the losing header is recorded as a Problem
("overridden by X-Mailjet-TrackOpen"). Two dialects that agree are not a
conflict. ``tags`` are not scalar: they are merged, in precedence order,
duplicates removed, order kept. This module is the one place the order lives.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from email.header import decode_header
from types import ModuleType
from typing import Any

from mjfilter.directives import Directives, Problem

from . import mailerq, mailjet, maxemail, smtpeter
from ._base import DialectResult, Header, make_problem, unique

__all__ = [
    "CONTROL_HEADER_PREFIXES",
    "INTERNAL_PREFIX",
    "PRECEDENCE",
    "DialectResult",
    "decode_encoded_words",
    "is_control_header",
    "merge",
    "parse_directives",
    "unfold",
]

log = logging.getLogger(__name__)

PRECEDENCE: tuple[str, ...] = ("mailjet", "smtpeter", "mailerq", "maxemail")
_MODULES: tuple[ModuleType, ...] = (mailjet, smtpeter, mailerq, maxemail)
assert tuple(m.NAME for m in _MODULES) == PRECEDENCE

INTERNAL_PREFIX = "x-mjfilter-"
CONTROL_HEADER_PREFIXES: tuple[str, ...] = tuple(p for m in _MODULES for p in m.PREFIXES) + (INTERNAL_PREFIX,)

# (lowercase prefix, dialect module), for the dispatch in parse_directives
_ROUTES: tuple[tuple[str, ModuleType], ...] = tuple((p, m) for m in _MODULES for p in m.PREFIXES)
# Every control header name starts with "x-" in some case: the first, cheapest test.
_X = frozenset({"x-", "X-"})

_FOLD = re.compile(rb"(?:\r\n|\r|\n)[ \t]*")
# A run of RFC 2047 encoded words separated only by white space.
_EW = r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?="
_EW_RUN = re.compile(rf"{_EW}(?:\s+{_EW})*")


def is_control_header(name: str) -> bool:
    """True for a header of any control family (vendor or mjfilter's own), any case."""
    return name.lower().startswith(CONTROL_HEADER_PREFIXES)


def unfold(value: bytes) -> bytes:
    """Each line break (CRLF, LF or a stray CR) and the white space after it -> one space."""
    if b"\n" in value or b"\r" in value:
        return _FOLD.sub(b" ", value)
    return value


def _decode_run(match: re.Match[str]) -> str:
    run = match.group(0)
    try:
        return "".join(
            # an RFC 2231 language suffix ("utf-8*en") is not part of the charset name
            word.decode((charset or "ascii").split("*", 1)[0], "replace") if isinstance(word, bytes) else word
            for word, charset in decode_header(run)
        )
    except Exception:  # malformed base64, unknown charset...: keep the text as it came
        return run


def decode_encoded_words(text: str) -> str:
    """Decode RFC 2047 encoded words in ``text``; everything else is kept verbatim.

    White space between two adjacent encoded words is dropped (RFC 2047); a
    malformed encoded word is left as it is, never raises.
    """
    if "=?" not in text:
        return text
    return _EW_RUN.sub(_decode_run, text)


def _text(raw: Any) -> str:
    """A header value as handed over by the MTA -> unfolded, decoded, stripped text."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "replace")
    elif not isinstance(raw, bytes):
        raw = bytes(raw)
    return unfold(raw).decode("utf-8", "replace").strip()


def _dialect_for(lname: str) -> ModuleType | None:
    for prefix, module in _ROUTES:
        if lname.startswith(prefix):
            return module
    return None


def parse_directives(headers: Iterable[tuple[str, bytes]]) -> Directives:
    """Read every control header of a message into one ``Directives``; never raises.

    ``headers`` are ``(name, value bytes)`` pairs exactly as the MTA hands them
    over (folded, 8-bit, encoded words). Non-control headers are skipped.
    """
    groups: dict[str, list[Header]] = {}
    try:
        for name, raw in headers:
            if name[:2] not in _X:
                continue
            lname = name.lower()
            module = _dialect_for(lname)
            if module is None:
                continue  # X-Mjfilter-* and any other X- header
            value = _text(raw)
            if lname in module.ENCODED_WORDS:
                value = decode_encoded_words(value)
            groups.setdefault(module.NAME, []).append((name, value))
    except Exception as e:  # a broken header list: use what was read so far
        log.warning("control headers: unreadable header list (%s)", type(e).__name__)
    if not groups:
        return Directives()
    results: list[tuple[DialectResult, list[Header]]] = []
    for module in _MODULES:
        own = groups.get(module.NAME)
        if own:
            results.append((_parse_safely(module, own), own))
    return merge(results)


def _parse_safely(module: ModuleType, headers: list[Header]) -> DialectResult:
    try:
        result: DialectResult = module.parse(headers)
        return result
    except Exception as e:  # a bug in a dialect must not lose the message
        log.warning("control headers: %s dialect failed (%s)", module.NAME, type(e).__name__)
        name, value = headers[0]
        return DialectResult(problems=[make_problem(name, value, f"internal error reading {module.NAME} headers")])


def _value_of(headers: list[Header], name: str) -> str:
    """The value of the first header called exactly ``name`` (as received)."""
    for n, v in headers:
        if n == name:
            return v
    return ""


def merge(results: list[tuple[DialectResult, list[Header]]]) -> Directives:
    """Combine dialect results, given in ``PRECEDENCE`` order, into one ``Directives``.

    The first dialect to set a scalar field wins; a later one that set it to a
    different value becomes a Problem on its header. Tags add up (duplicates
    removed, order kept); ``sources["tags"]`` lists every header that added some.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[Problem] = []
    tags: list[str] = []
    tag_sources: list[str] = []
    overridden: list[Problem] = []
    for result, own in results:
        problems.extend(result.problems)
        for field, value in result.values.items():
            source = result.sources.get(field, "")
            if field == "tags":
                tags.extend(value)
                tag_sources.append(source)
            elif field not in values:
                values[field] = value
                sources[field] = source
            elif value != values[field]:
                overridden.append(make_problem(source, _value_of(own, source), f"overridden by {sources[field]}"))
    if tags:
        values["tags"] = unique(tags)
        sources["tags"] = ", ".join(unique(tag_sources))
    problems.extend(overridden)
    return Directives(**values, sources=sources, problems=problems)
