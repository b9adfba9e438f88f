"""Mailjet SMTP relay headers: ``X-Mailjet-*`` and ``X-MJ-*``.

Campaign, campaign deduplication, custom id and event payload, open/click
tracking, priority and transactional templating. Names are case-insensitive;
a repeated header counts once (the first instance). Any other ``X-Mailjet-*``
or ``X-MJ-*`` header is ignored here (it is still a control header and is
stripped before queueing).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from ._base import DialectResult, Header, bool_reason, first_instances, parse_bool, parse_uint

NAME = "mailjet"
PREFIXES: tuple[str, ...] = ("x-mailjet-", "x-mj-")
# Headers whose value may carry RFC 2047 encoded words worth decoding.
ENCODED_WORDS = frozenset({"x-mailjet-campaign", "x-mj-customid", "x-mj-eventpayload", "x-mj-vars"})

CAMPAIGN_MAX = 255
PRIORITY_MAX = 3
DEDUP_TRUE = frozenset({"true", "yes", "y", "1"})
DEDUP_FALSE = frozenset({"false", "no", "n", "0"})
NEEDS_CAMPAIGN = "X-Mailjet-DeduplicateCampaign needs X-Mailjet-Campaign"

Handler = Callable[[DialectResult, str, str], None]


def parse(headers: list[Header]) -> DialectResult:
    """Read Mailjet's headers (this dialect's only, unfolded and decoded, in message order)."""
    result = DialectResult()
    first = first_instances(headers, result)
    for lname, (name, value) in first.items():
        handler = HANDLERS.get(lname)
        if handler is not None:
            handler(result, name, value)
    if result.values.get("dedup") and "campaign" not in result.values:
        name, value = first["x-mailjet-deduplicatecampaign"]
        result.problem(name, value, NEEDS_CAMPAIGN)
        result.unset("dedup")
    return result


def campaign_problem(value: str) -> str | None:
    """Why ``value`` is not a valid campaign id, or ``None`` when it is."""
    if not value:
        return "empty campaign"
    if len(value) > CAMPAIGN_MAX:
        return f"too long ({len(value)} characters, at most {CAMPAIGN_MAX})"
    for ch in value:
        if not (ch.isalnum() or ch in " -_"):
            return f"bad character {ch!r} (letters, digits, space, dash and underscore only)"
    return None


def _campaign(result: DialectResult, name: str, value: str) -> None:
    reason = campaign_problem(value)
    if reason:
        result.problem(name, value, reason)
    else:
        result.set("campaign", value, name)


def _dedup(result: DialectResult, name: str, value: str) -> None:
    flag = parse_bool(value, DEDUP_TRUE, DEDUP_FALSE)
    if flag is None:
        result.problem(name, value, bool_reason(DEDUP_TRUE, DEDUP_FALSE))
    else:
        result.set("dedup", flag, name)


def _text(field: str) -> Handler:
    """Any text, kept as it is; an empty value is the same as no header."""

    def handle(result: DialectResult, name: str, value: str) -> None:
        if value:
            result.set(field, value, name)

    return handle


def _track(field: str) -> Handler:
    """``0`` off, ``1`` on; anything else means "use the default" (a Problem)."""

    def handle(result: DialectResult, name: str, value: str) -> None:
        if value == "1":
            result.set(field, True, name)
        elif value == "0":
            result.set(field, False, name)
        else:
            result.problem(name, value, "not 0 or 1: the configured default applies")

    return handle


def _priority(result: DialectResult, name: str, value: str) -> None:
    prio = parse_uint(value)
    if prio is None or prio > PRIORITY_MAX:
        result.problem(name, value, f"not a priority (0..{PRIORITY_MAX})")
    else:
        result.set("priority", prio, name)


def _template_language(result: DialectResult, name: str, value: str) -> None:
    flag = parse_bool(value)
    if flag is None:
        result.problem(name, value, bool_reason())
    else:
        result.set("template_language", flag, name)


def _template_id(result: DialectResult, name: str, value: str) -> None:
    if value:
        result.set("template_id", value, name)
    else:
        result.problem(name, value, "empty template id")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_vars(value: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(object, None)`` for a JSON object, ``(None, reason)`` otherwise."""
    try:
        data = json.loads(value, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON: {e.msg} at char {e.pos}"
    except (ValueError, RecursionError) as e:
        return None, f"not valid JSON: {str(e)[:80] or type(e).__name__}"
    if not isinstance(data, dict):
        return None, f"not a JSON object (a JSON {_json_type(data)})"
    return data, None


def _json_type(data: Any) -> str:
    if isinstance(data, list):
        return "array"
    if isinstance(data, str):
        return "string"
    if isinstance(data, bool):
        return "boolean"
    if data is None:
        return "null"
    return "number"


def _vars(result: DialectResult, name: str, value: str) -> None:
    data, reason = parse_vars(value)
    if reason:
        result.problem(name, value, reason)
    else:
        result.set("template_vars", data, name)


def address_problem(value: str) -> str | None:
    """Why ``value`` is not a plain address (a basic check), or ``None`` when it is."""
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    if value.count("@") != 1:
        return "not an address (needs exactly one @)"
    local, domain = value.split("@")
    if not local or not domain:
        return "not an address (empty local part or domain)"
    for ch in value:
        if ch.isspace() or ch in '<>,;"' or not ch.isprintable():
            return f"not an address (bad character {ch!r})"
    return None


def _error_reporting(result: DialectResult, name: str, value: str) -> None:
    reason = address_problem(value)
    if reason:
        result.problem(name, value, reason)
    else:
        address = value[1:-1] if value.startswith("<") and value.endswith(">") else value
        result.set("template_error_reporting", address, name)


def _error_deliver(result: DialectResult, name: str, value: str) -> None:
    word = value.lower()
    if word == "deliver":
        result.set("template_error_deliver", True, name)
    elif word == "0":
        result.set("template_error_deliver", False, name)
    else:
        result.problem(name, value, "not 'deliver' or '0'")


HANDLERS: MappingProxyType[str, Handler] = MappingProxyType({
    "x-mailjet-campaign": _campaign,
    "x-mailjet-deduplicatecampaign": _dedup,
    "x-mj-customid": _text("custom_id"),
    "x-mj-eventpayload": _text("payload"),
    "x-mailjet-trackopen": _track("track_open"),
    "x-mailjet-trackclick": _track("track_click"),
    "x-mailjet-prio": _priority,
    "x-mj-templatelanguage": _template_language,
    "x-mj-templateid": _template_id,
    "x-mj-vars": _vars,
    "x-mj-templateerrorreporting": _error_reporting,
    "x-mj-templateerrordeliver": _error_deliver,
})
