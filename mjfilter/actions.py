"""Typed edits and verdicts, and ``Actions``, which applies and records them.

A plugin step changes a message only through ``Actions``: each edit is applied to
the in-memory transaction at once (later steps see it) and recorded, in order,
for the front end to replay against the MTA. Recorded header edits name a field
by (name, 1-based occurrence among fields of that name, case-insensitive) in the
state the message had when the edit was made, which is how Postfix and Sendmail
number them; a step deleting several fields deletes from the last one up, so
the numbering of the fields still to delete never shifts.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from collections.abc import Callable

from .model import Body, Message, Transaction

Verdict = Literal["accept", "reject", "tempfail", "discard", "quarantine"]

# What a plugin may declare it needs (``mjfilter_capabilities``); the milter front
# end negotiates only these with the MTA.
CAPABILITIES = frozenset(
    {
        "add_header",
        "change_header",
        "replace_body",
        "change_sender",
        "add_recipient",
        "delete_recipient",
        "quarantine",
    }
)

_FIELD_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII but ':'
_STATUS = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}$")


class ActionError(ValueError):
    """An edit or verdict that is not valid (bad header name, 2xx reject code ...)."""


def check_header_name(name: str) -> str:
    if not _FIELD_NAME.match(name):
        raise ActionError(f"invalid header field name {name!r}")
    return name


def check_header_value(value: str | bytes) -> bytes:
    """Header values placed by mjfilter carry no CR, LF or NUL (no header injection)."""
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if b"\r" in raw or b"\n" in raw or b"\0" in raw:
        raise ActionError("header value contains CR, LF or NUL")
    return raw


def check_address(addr: str) -> str:
    if any(c in addr for c in "\r\n\0<> "):
        raise ActionError(f"invalid envelope address {addr!r}")
    return addr


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply for a non-accept verdict: code 4xx/5xx, enhanced status, text."""

    code: int
    status: str
    text: str

    def __post_init__(self) -> None:
        if not 400 <= self.code <= 599:
            raise ActionError(f"reply code {self.code} is not 4xx or 5xx")
        m = _STATUS.match(self.status)
        if not m or m.group(1) != str(self.code)[0]:
            raise ActionError(f"enhanced status {self.status!r} does not match code {self.code}")
        if any(c in self.text for c in "\r\n\0"):
            raise ActionError("reply text contains CR, LF or NUL")

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "status": self.status, "text": self.text}


TEMPFAIL_REPLY = Reply(451, "4.3.0", "Temporary failure, please try again later")


# -- recorded edits ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AddHeader:
    name: str
    value: bytes


@dataclass(frozen=True, slots=True)
class InsertHeader:
    index: int  # 0 = before the first field
    name: str
    value: bytes


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    name: str
    occurrence: int  # 1-based among fields called ``name``
    value: bytes | None  # None deletes the field


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    body: Body = field(repr=False)


@dataclass(frozen=True, slots=True)
class ChangeSender:
    sender: str
    params: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AddRecipient:
    recipient: str
    params: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    recipient: str


Edit = AddHeader | InsertHeader | ChangeHeader | ReplaceBody | ChangeSender | AddRecipient | DeleteRecipient

_EDIT_CAPABILITY = {
    AddHeader: "add_header",
    InsertHeader: "add_header",
    ChangeHeader: "change_header",
    ReplaceBody: "replace_body",
    ChangeSender: "change_sender",
    AddRecipient: "add_recipient",
    DeleteRecipient: "delete_recipient",
}


# The internal header that carries a route to the MTA (Postfix: milter_header_checks FILTER).
ROUTE_HEADER = "X-Mjfilter-Route"


@dataclass(frozen=True, slots=True)
class Route:
    """The next hop chosen for the message, and what chose it."""

    nexthop: str
    reason: str = ""
    step: str = ""
    transport: str = ""

    @property
    def target(self) -> str:
        """``transport:nexthop`` as Postfix's FILTER action takes it (the nexthop alone without a transport)."""
        return f"{self.transport}:{self.nexthop}" if self.transport else self.nexthop

    def as_dict(self) -> dict[str, str]:
        return {"transport": self.transport, "nexthop": self.nexthop, "target": self.target,
                "reason": self.reason, "step": self.step}


@dataclass(slots=True)
class Delivery:
    """A copy of the message to hand to the MTA: sender, recipients, full content."""

    sender: str
    recipients: list[str]
    message: Message

    def as_dict(self) -> dict[str, Any]:
        return {
            "sender": self.sender,
            "recipients": list(self.recipients),
            "message": self.message.as_bytes().decode("utf-8", "surrogateescape"),
        }


@dataclass(slots=True)
class Event:
    """Something that happened to a message, for event sinks (sent, blocked ...)."""

    event: str
    email: str | None = None
    time: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.event, "email": self.email, "time": self.time, **self.data}


class Actions:
    """What one transaction's steps decided: edits, verdict, route, copies, events.

    The chain gives every step the same ``Actions``; ``step`` and ``allowed`` are
    set by the chain before each step so that an edit a plugin did not declare in
    ``mjfilter_capabilities`` fails at once, in that step, not at end-of-message.
    """

    __slots__ = (
        "txn", "edits", "verdict", "reply", "quarantine_reason", "route",
        "deliveries", "events", "notes", "step", "allowed", "verdict_step",
    )

    def __init__(self, txn: Transaction) -> None:
        self.txn = txn
        self.edits: list[Edit] = []
        self.verdict: Verdict = "accept"
        self.reply: Reply | None = None
        self.quarantine_reason: str | None = None
        self.route: Route | None = None
        self.deliveries: list[Delivery] = []
        self.events: list[Event] = []
        self.notes: list[str] = []
        self.step: str = ""
        self.allowed: frozenset[str] | None = None  # None: anything (tests, tools)
        self.verdict_step: str | None = None

    # -- bookkeeping -------------------------------------------------------
    def _record(self, edit: Edit) -> None:
        cap = _EDIT_CAPABILITY[type(edit)]
        if self.allowed is not None and cap not in self.allowed:
            raise ActionError(
                f"step {self.step!r} made a {cap} edit but did not declare it in mjfilter_capabilities"
            )
        self.edits.append(edit)

    @property
    def final(self) -> bool:
        """True once a terminal verdict (anything but accept) was given."""
        return self.verdict != "accept"

    def note(self, text: str) -> None:
        """Add a line to the trace of the current step (no credentials, no bodies)."""
        self.notes.append(f"{self.step}: {text}" if self.step else text)

    # -- headers -------------------------------------------------------------
    def add_header(self, name: str, value: str | bytes) -> None:
        """Append a header field at the end of the header."""
        raw = check_header_value(value)
        self._record(AddHeader(check_header_name(name), raw))
        self.txn.message.headers.append((name, raw))

    def insert_header(self, index: int, name: str, value: str | bytes) -> None:
        """Insert a header field before the field at ``index`` (0 = first)."""
        raw = check_header_value(value)
        index = max(0, min(index, len(self.txn.message.headers)))
        self._record(InsertHeader(index, check_header_name(name), raw))
        self.txn.message.headers.insert(index, (name, raw))

    def change_header(self, name: str, value: str | bytes, occurrence: int = 1) -> None:
        """Replace the value of the ``occurrence``-th field called ``name``; add it when missing."""
        raw = check_header_value(value)
        where = self.txn.message.occurrences(check_header_name(name))
        if occurrence < 1:
            raise ActionError("header occurrence counts from 1")
        if occurrence > len(where):
            self.add_header(name, raw)
            return
        self._record(ChangeHeader(name, occurrence, raw))
        i = where[occurrence - 1]
        self.txn.message.headers[i] = (self.txn.message.headers[i][0], raw)

    def delete_header(self, name: str, occurrence: int | None = None) -> int:
        """Delete one field (``occurrence``) or every field called ``name``; returns how many."""
        where = self.txn.message.occurrences(check_header_name(name))
        if occurrence is not None:
            where = where[occurrence - 1 : occurrence] if occurrence >= 1 else []
            numbers = [occurrence] if where else []
        else:
            numbers = list(range(1, len(where) + 1))
        for number, index in sorted(zip(numbers, where, strict=True), reverse=True):
            self._record(ChangeHeader(self.txn.message.headers[index][0], number, None))
            del self.txn.message.headers[index]
        return len(where)

    def delete_headers_where(self, predicate: Callable[[str], bool]) -> int:
        """Delete every field whose name satisfies ``predicate``, last field first."""
        names = {n.lower(): n for n, _ in self.txn.message.headers if predicate(n)}
        return sum(self.delete_header(n) for n in names.values())

    # -- body and envelope -----------------------------------------------------
    def replace_body(self, body: bytes | Body) -> None:
        """Replace the whole body (CRLF line endings expected)."""
        new = body if isinstance(body, Body) else Body(body)
        self._record(ReplaceBody(new))
        self.txn.message.body = new

    def change_sender(self, sender: str, params: tuple[str, ...] = ()) -> None:
        """Change the envelope sender (``""`` for the null sender)."""
        self._record(ChangeSender(check_address(sender), tuple(params)))
        self.txn.envelope.sender = sender

    def add_recipient(self, recipient: str, params: tuple[str, ...] = ()) -> None:
        self._record(AddRecipient(check_address(recipient), tuple(params)))
        self.txn.envelope.recipients.append(recipient)

    def delete_recipient(self, recipient: str) -> None:
        """Remove a recipient (exact address as given at RCPT TO)."""
        if recipient not in self.txn.envelope.recipients:
            raise ActionError(f"{recipient!r} is not a recipient of this message")
        self._record(DeleteRecipient(recipient))
        self.txn.envelope.recipients.remove(recipient)

    # -- verdicts -------------------------------------------------------------
    def reject(self, text: str, code: int = 550, status: str = "5.7.1") -> None:
        """Refuse the message permanently (5xx); stops the chain."""
        if code // 100 != 5:
            raise ActionError("reject needs a 5xx code; use tempfail for 4xx")
        self._set("reject", Reply(code, status, text))

    def tempfail(self, text: str = TEMPFAIL_REPLY.text, code: int = 451, status: str = "4.3.0") -> None:
        """Ask the client to retry later (4xx); stops the chain."""
        if code // 100 != 4:
            raise ActionError("tempfail needs a 4xx code")
        self._set("tempfail", Reply(code, status, text))

    def discard(self, reason: str) -> None:
        """Accept the message from the client but deliver it nowhere; stops the chain."""
        self.notes.append(f"{self.step}: discard: {reason}")
        self._set("discard", None)

    def quarantine(self, reason: str) -> None:
        """Accept the message into the MTA's hold queue; stops the chain."""
        if self.allowed is not None and "quarantine" not in self.allowed:
            raise ActionError(f"step {self.step!r} quarantined but did not declare it in mjfilter_capabilities")
        if any(c in reason for c in "\r\n\0"):
            raise ActionError("quarantine reason contains CR, LF or NUL")
        self.quarantine_reason = reason
        self._set("quarantine", None)

    def _set(self, verdict: Verdict, reply: Reply | None) -> None:
        self.verdict = verdict
        self.reply = reply
        self.verdict_step = self.step

    # -- routing, copies, events ------------------------------------------------
    def set_route(self, nexthop: str, reason: str = "", transport: str = "") -> None:
        """Choose the next hop (``[host]:port``; empty: the recipient domain's MX) and the
        MTA transport to deliver through (empty: the MTA's default).

        ``reason`` says what chose it (a rule, a map entry), for traces and ``check``.
        """
        for v in (nexthop, transport, reason):
            check_header_value(v)
        if transport and (":" in transport or any(c.isspace() for c in transport)):
            raise ActionError(f"transport {transport!r} contains ':' or whitespace")
        if not nexthop and not transport:
            raise ActionError("set_route needs a nexthop, a transport or both")
        self.route = Route(nexthop, reason, self.step, transport)

    def add_delivery(self, sender: str, recipients: list[str], message: Message) -> None:
        """Hand the MTA an extra copy (content differing per recipient).

        The milter front end reinjects extra copies before it answers the
        client; the live transaction carries the main copy.
        """
        for r in recipients:
            check_address(r)
        self.deliveries.append(Delivery(check_address(sender), list(recipients), message))

    def emit(self, event: str, email: str | None = None, **data: Any) -> None:
        """Record an event (``sent``, ``blocked`` ...) for the event sinks."""
        self.events.append(Event(event, email, data=data))
