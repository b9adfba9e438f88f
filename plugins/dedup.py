"""``dedup``: Mailjet campaign deduplication (``X-Mailjet-DeduplicateCampaign``).

When a message asks for it (``txn.directives.dedup`` with a campaign), only
the first message per (campaign, recipient) is delivered: every later one
loses that recipient and yields a ``blocked`` event with the error
"duplicate in campaign". A message left with no recipient is discarded by
the engine.

Each (tenant, campaign, recipient) is a store reservation whose holder is
the message's fingerprint (Message-ID plus body hash), claimed for every
recipient in one atomic store round-trip: a retry of the same message wins
its own reservations again and is never a duplicate, and concurrent copies
on any number of nodes sharing the store deliver exactly once. When the
transaction ends in tempfail or reject, the reservations this attempt newly
claimed are released, so the client's retry (or a corrected message) is not
blocked; a reservation the same message already held stays, because the
earlier attempt that made it may have been delivered.

The step also counts every accepted message that names a campaign (with or
without deduplication) for ``mjfilter campaigns``.

Per-message state: ``txn.state[<step name>]`` (the name comes from
``mjfilter_startup``; ``"dedup"`` when the step was never started), a
``Reservation``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from mjfilter import hookimpl
from mjfilter.store import CLAIMED, TAKEN, StoreUnavailable

log = logging.getLogger(__name__)

KEY_PREFIX = "dedup:"
STATE_KEY = "dedup"
BLOCKED_ERROR = "duplicate in campaign"
UNAUTHENTICATED = "-"
# verdicts after which the message left the client's hands: its reservations stand
KEPT_VERDICTS = frozenset({"accept", "quarantine", "discard"})


class Config(BaseModel):
    """``config:`` of a ``dedup`` step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: int | None = Field(None, ge=1, description="seconds a recipient stays served "
                                                       "(default: forever, like Mailjet)")
    normalize_case: bool = Field(False, description="compare local parts case-insensitively "
                                                    "(domains always are)")
    normalize_plus: bool = Field(False, description="drop a +tag from the local part before comparing")
    per_tenant: bool = Field(True, description="scope campaigns per authenticated user "
                                               "({auth_authen}; '-' when unauthenticated)")

    _state_key: str = PrivateAttr(STATE_KEY)

    @property
    def state_key(self) -> str:
        """The ``txn.state`` key of this step (its step name once started)."""
        return self._state_key


@dataclass(slots=True)
class Reservation:
    """What one message's ``dedup`` step did, for ``mjfilter_transaction_end``."""

    tenant: str
    campaign: str
    holder: str | None = None  # None: nothing was reserved (no dedup asked)
    keys: tuple[str, ...] = ()  # the keys this attempt newly claimed (released if it fails)
    blocked: int = 0


# -- keys ---------------------------------------------------------------------------
def tenant_of(auth_user: str | None) -> str:
    """The tenant a message belongs to: its SASL login, ``-`` when unauthenticated."""
    return auth_user if auth_user else UNAUTHENTICATED


def normalize_recipient(address: str, config: Config) -> str:
    """The recipient as compared: domain lowercased, local part as the options say."""
    local, at, domain = address.strip().rpartition("@")
    if not at:  # no domain (a local address): the whole thing is the local part
        local, domain = address.strip(), ""
    if config.normalize_plus and "+" in local:
        base = local.split("+", 1)[0]
        local = base or local
    if config.normalize_case:
        local = local.lower()
    return f"{local}@{domain.lower()}" if at else local


def dedup_key(scope: list[str], campaign: str, recipient: str) -> str:
    """A bounded, character-safe store key for (scope, campaign, normalised recipient)."""
    material = json.dumps([scope, campaign, recipient], ensure_ascii=False, separators=(",", ":"))
    return KEY_PREFIX + hashlib.sha256(material.encode("utf-8")).hexdigest()


def key_scope(auth_user: str | None, config: Config) -> list[str]:
    """Who shares reservations: one authenticated user, the unauthenticated, or everyone."""
    if not config.per_tenant:
        return ["all"]
    return ["user", auth_user] if auth_user else ["anonymous"]


def recipient_keys(recipients: list[str], scope: list[str], campaign: str,
                   config: Config) -> tuple[dict[str, str], list[str]]:
    """Map each recipient to its key; also list the recipients that repeat an earlier one.

    A recipient that normalises to the same key as an earlier, *different*
    address of the same message is a duplicate within the message. The very
    same address given twice is left to the MTA (which drops exact repeats).
    """
    keys: dict[str, str] = {}
    first_by_key: dict[str, str] = {}
    repeats: list[str] = []
    for rcpt in recipients:
        if rcpt in keys:
            continue
        key = dedup_key(scope, campaign, normalize_recipient(rcpt, config))
        if key in first_by_key:
            repeats.append(rcpt)
            continue
        keys[rcpt] = key
        first_by_key[key] = rcpt
    return keys, repeats


# -- hooks --------------------------------------------------------------------------
@hookimpl
def mjfilter_config_model() -> type[BaseModel]:
    return Config


@hookimpl
def mjfilter_capabilities(config: Config) -> list[str]:
    return ["delete_recipient"]


@hookimpl
def mjfilter_startup(app: Any, config: Config, step: str) -> None:
    config._state_key = step


@hookimpl
def mjfilter_message(txn: Any, actions: Any, config: Config, app: Any) -> None:
    """Reserve every recipient in one round-trip; drop the ones another message holds.

    ``StoreUnavailable`` is never caught here: the engine answers 451.
    """
    campaign = txn.directives.campaign
    if not campaign:
        return
    reservation = Reservation(tenant_of(txn.auth_user), campaign)
    txn.state[config.state_key] = reservation
    if not txn.directives.dedup or not txn.envelope.recipients:
        return
    keys, repeats = recipient_keys(list(txn.envelope.recipients), key_scope(txn.auth_user, config),
                                   campaign, config)
    holder = txn.fingerprint()
    ordered = list(keys.items())
    won = app.store.reserve([k for _, k in ordered], holder, ttl=config.window)
    reservation.holder = holder
    # only what this attempt claimed is released if it fails: a key the same message
    # already HELD comes from an earlier attempt, which may have been delivered
    reservation.keys = tuple(k for (_, k), got in zip(ordered, won, strict=True) if got == CLAIMED)
    losers = [rcpt for (rcpt, _), got in zip(ordered, won, strict=True) if got == TAKEN] + repeats
    for rcpt in losers:
        actions.delete_recipient(rcpt)
        actions.emit("blocked", rcpt, error=BLOCKED_ERROR, campaign=campaign)
    reservation.blocked = len(losers)
    if losers:
        actions.note(f"blocked {len(losers)} duplicate recipient{'s' if len(losers) != 1 else ''}")


@hookimpl
def mjfilter_transaction_end(txn: Any, outcome: Any, config: Config, app: Any) -> None:
    """Release on tempfail/reject; count the campaign when the message left the client."""
    reservation = txn.state.get(config.state_key)
    if not isinstance(reservation, Reservation):
        return
    try:
        if outcome.verdict not in KEPT_VERDICTS:
            release(app, reservation)
        else:
            count(app, reservation, delivered_recipients(txn, outcome))
    except StoreUnavailable as e:
        # a reservation left behind is harmless for the retry: it has the same holder
        log.error("dedup: store unavailable at transaction end (campaign counters or release skipped): %s", e)


def release(app: Any, reservation: Reservation) -> None:
    """Free what this message reserved (compare-and-delete: only keys it still holds)."""
    if reservation.holder is not None and reservation.keys:
        app.store.release(list(reservation.keys), reservation.holder)


def count(app: Any, reservation: Reservation, delivered: int) -> None:
    """Add the message to its campaign's counters."""
    app.store.campaign_add(reservation.tenant, reservation.campaign, messages=1, delivered=delivered,
                           blocked=reservation.blocked)


def delivered_recipients(txn: Any, outcome: Any) -> int:
    """Distinct recipients the message goes to: the live copy (when accepted) and extra copies."""
    rcpts: set[str] = set()
    if outcome.verdict == "accept":
        rcpts.update(txn.envelope.recipients)
    for delivery in outcome.deliveries:
        rcpts.update(delivery.recipients)
    return len(rcpts)
