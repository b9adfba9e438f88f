"""``suppression``: master suppression lists (Maxemail, MailerQ).

Two lists live in the store: ``unsubscribe`` and ``bounce``, each holding
addresses (``user@domain``) and whole domains (``@domain``), with an optional
SMTP code and reason per entry (``mjfilter suppress ...`` manages them).

- The unsubscribe list is checked only when the message asks for it
  (Maxemail ``X-Mxm-Flags`` bit 4) or the step's ``check_unsubscribe`` is on
  (typically in a step with a ``when:`` rule for some senders).
- The bounce list is checked unless ``check_bounce`` is off or the message
  says to ignore it (``X-Mxm-Flags`` bit 8).

A suppressed recipient is removed and gets a ``blocked`` event. When every
recipient is suppressed the message is refused with the code of the first
suppressed recipient's entry (or ``default_code``): 5xx rejects, 4xx
tempfails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mjfilter import hookimpl
from mjfilter.actions import ActionError, Reply
from mjfilter.store import SuppressionEntry

REPLY_PREFIX = "recipient suppressed: "
MAX_REASON = 100  # characters of an entry's reason that reach an SMTP reply
ERRORS = {"unsubscribe": "unsubscribed", "bounce": "bounce list"}
_UNSAFE = re.compile(r"[^\x20-\x7e]")  # SMTP reply text: printable ASCII only


class Config(BaseModel):
    """``config:`` of a ``suppression`` step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    check_unsubscribe: bool = Field(False, description="always check the unsubscribe list "
                                                       "(else only with X-Mxm-Flags bit 4)")
    check_bounce: bool = Field(True, description="check the bounce list (unless X-Mxm-Flags bit 8)")
    default_code: int = Field(550, ge=400, le=599, description="reply code when no entry names one")
    default_status: str = Field("5.7.1", description="enhanced status for default_code")

    @model_validator(mode="after")
    def _reply(self) -> Config:
        try:  # the same rules as every reply mjfilter gives (mjfilter.actions.Reply)
            Reply(self.default_code, self.default_status, REPLY_PREFIX)
        except ActionError as e:
            raise ValueError(f"default_code/default_status: {e}") from None
        return self


@dataclass(frozen=True, slots=True)
class Hit:
    """One suppressed recipient: the address as given at RCPT TO and the entry that matched."""

    recipient: str
    entry: SuppressionEntry


def lists_to_check(txn: Any, config: Config) -> list[str]:
    """The lists this message is checked against, in order."""
    lists = []
    if config.check_unsubscribe or txn.directives.check_unsubscribe is True:
        lists.append("unsubscribe")
    if config.check_bounce and txn.directives.ignore_bounce_list is not True:
        lists.append("bounce")
    return lists


def find_hits(store: Any, lists: list[str], recipients: list[str]) -> list[Hit]:
    """One ``suppressed`` call per list, on the recipients no earlier list matched."""
    hits: list[Hit] = []
    remaining = list(dict.fromkeys(recipients))
    for name in lists:
        if not remaining:
            break
        found = store.suppressed(name, remaining)
        hits.extend(Hit(r, found[r]) for r in remaining if r in found)
        remaining = [r for r in remaining if r not in found]
    order = {r: i for i, r in enumerate(recipients)}
    return sorted(hits, key=lambda h: order[h.recipient])


def reply_text(entry: SuppressionEntry) -> str:
    """``recipient suppressed: <reason or list name>``: printable ASCII, short, no CR/LF."""
    reason = _UNSAFE.sub("?", " ".join((entry.reason or "").split()))
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 3].rstrip() + "..."
    return REPLY_PREFIX + (reason or entry.list)


def refuse(actions: Any, entry: SuppressionEntry, config: Config) -> None:
    """Reject (5xx) or tempfail (4xx) with the entry's code, else the configured default."""
    code = entry.code if entry.code is not None and 400 <= entry.code <= 599 else config.default_code
    klass = str(code)[0]
    status = config.default_status if config.default_status[0] == klass else f"{klass}.7.1"
    if klass == "5":
        actions.reject(reply_text(entry), code=code, status=status)
    else:
        actions.tempfail(reply_text(entry), code=code, status=status)


@hookimpl
def mjfilter_config_model() -> type[BaseModel]:
    return Config


@hookimpl
def mjfilter_capabilities(config: Config) -> list[str]:
    return ["delete_recipient"]


@hookimpl
def mjfilter_message(txn: Any, actions: Any, config: Config, app: Any) -> None:
    """Drop suppressed recipients; refuse the message when none is left.

    ``StoreUnavailable`` is never caught here: the engine answers 451.
    """
    lists = lists_to_check(txn, config)
    recipients = list(txn.envelope.recipients)
    if not lists or not recipients:
        return
    hits = find_hits(app.store, lists, recipients)
    if not hits:
        return
    everyone = {h.recipient for h in hits} >= set(recipients)
    for hit in hits:
        e = hit.entry
        actions.emit("blocked", hit.recipient, error=ERRORS.get(e.list, e.list), list=e.list, entry=e.entry,
                     reason=e.reason)
        while not everyone and hit.recipient in txn.envelope.recipients:
            actions.delete_recipient(hit.recipient)
    if everyone:
        refuse(actions, hits[0].entry, config)
    else:
        actions.note(f"removed {len(hits)} suppressed recipient{'s' if len(hits) != 1 else ''}")
