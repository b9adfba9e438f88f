"""MailerQ headers: ``x-mq-*``.

``x-mq-smarthost-hostname``/``-port``/``-username``/``-password`` make a
per-message ``Smarthost``. Behind Postfix the username and password headers never
reach the milter: cleanup's ``header_checks`` hand them to mjfilter's socketmap,
which keeps them encrypted and leaves ``x-mq-smarthost-username-ref: TOKEN`` in
their place (``mjfilter.routing.vault``); the ``Smarthost`` then carries
``credential_ref``; ``x-mq-tag`` adds tags; ``x-mq-inlinecss`` switches
CSS inlining; every other ``x-mq-*`` header becomes a message property (name
without the prefix, lowercased). The password never appears in a Problem.
"""

from __future__ import annotations

import ipaddress
import re

from mjfilter.directives import Smarthost

from ._base import DialectResult, Header, bool_reason, first_instances, parse_bool, parse_uint, split_tags, unique

NAME = "mailerq"
PREFIXES: tuple[str, ...] = ("x-mq-",)
ENCODED_WORDS: frozenset[str] = frozenset()

PREFIX = "x-mq-"
HOSTNAME = "x-mq-smarthost-hostname"
PORT = "x-mq-smarthost-port"
USERNAME = "x-mq-smarthost-username"
PASSWORD = "x-mq-smarthost-password"
CREDENTIAL_REF = "x-mq-smarthost-username-ref"
SMARTHOST_HEADERS = (HOSTNAME, PORT, USERNAME, PASSWORD, CREDENTIAL_REF)
TAG = "x-mq-tag"
INLINECSS = "x-mq-inlinecss"
DEFAULT_PORT = 25

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def parse(headers: list[Header]) -> DialectResult:
    """Read MailerQ's headers (this dialect's only, unfolded and decoded, in message order)."""
    result = DialectResult()
    first = first_instances(headers, result, multi=frozenset({TAG}))
    tags = [t for name, value in headers if name.lower() == TAG for t in split_tags(value)]
    if tags:
        result.set("tags", unique(tags), next(n for n, _ in headers if n.lower() == TAG))
    if INLINECSS in first:
        name, value = first[INLINECSS]
        flag = parse_bool(value)
        if flag is None:
            result.problem(name, value, bool_reason())
        else:
            result.set("inline_css", flag, name)
    _smarthost(result, first)
    properties: dict[str, str] = {}
    source = ""
    for lname, (name, value) in first.items():
        if lname in SMARTHOST_HEADERS or lname == INLINECSS:
            continue
        key = lname[len(PREFIX):]
        if not key:
            result.problem(name, value, "no property name after x-mq-")
        elif "password" in key:
            result.problem(name, value, "credential header other than x-mq-smarthost-password: ignored")
        else:
            properties[key] = value
            source = source or name
    if properties:
        result.set("properties", properties, source)
    return result


def hostname_problem(value: str) -> str | None:
    """Why ``value`` is not a hostname or IP address (optionally in brackets), or ``None``."""
    if not value:
        return "empty hostname"
    host = bare_host(value)
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if len(host) <= 253 and _HOSTNAME_RE.fullmatch(host):
        return None
    return "not a hostname or IP address"


def bare_host(value: str) -> str:
    """The host without IP-literal brackets (``[192.0.2.1]`` -> ``192.0.2.1``)."""
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
        if value[:5].lower() == "ipv6:":
            value = value[5:]
    return value


def _smarthost(result: DialectResult, first: dict[str, Header]) -> None:
    """Build ``smarthost`` from the ``x-mq-smarthost-*`` headers, or record why not."""
    if HOSTNAME not in first:
        for lname in (PORT, USERNAME, PASSWORD, CREDENTIAL_REF):
            if lname in first:
                name, value = first[lname]
                result.problem(name, value, "needs x-mq-smarthost-hostname: no smarthost")
        return
    host_name, host = first[HOSTNAME]
    reason = hostname_problem(host)
    if reason:
        result.problem(host_name, host, reason + ": no smarthost")
        return
    port = DEFAULT_PORT
    if PORT in first:
        name, value = first[PORT]
        parsed = parse_uint(value, max_digits=5)
        if parsed is None or not 1 <= parsed <= 65535:
            result.problem(name, value, "not a port (1..65535): no smarthost")
            return
        port = parsed
    username = first[USERNAME][1] if USERNAME in first else ""
    password = first[PASSWORD][1] if PASSWORD in first else ""
    ref = first[CREDENTIAL_REF][1] if CREDENTIAL_REF in first and not (username or password) else ""
    if bool(username) != bool(password):
        present = first[USERNAME] if username else first[PASSWORD]
        missing = "x-mq-smarthost-password" if username else "x-mq-smarthost-username"
        result.problem(present[0], present[1], f"without {missing}")
        username = password = ref = ""
    result.set("smarthost", Smarthost(bare_host(host), port, username or None, password or None, ref or None),
               host_name)
