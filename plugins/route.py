"""``route``: choose each message's next hop (smarthost selection) from ``routing:``.

The rules live in the top-level ``routing:`` section, because Postfix also asks
them over the socketmap front end (SASL credentials, relay hosts) when it
delivers. This step applies them to one message, in this order:

1. a per-message smarthost (MailerQ ``x-mq-smarthost-*``), only for senders a
   ``routing.per_message.allow`` rule allows, only to allowed hosts and ports,
   never to a loopback/private/link-local address unless a rule says so
   explicitly: otherwise ``550 5.7.1`` with the reason;
2. the sender-dependent relay maps (``user+ext@domain``, ``user@domain``,
   ``@domain``), then ``routing.default``;
3. ``X-Mailjet-Prio`` picks the Postfix transport of ``routing.priority``;
4. in sink mode (``routing.sink``) every message goes to the sink, and the
   header ``X-Mjfilter-Would-Route`` says where it would have gone.

With nothing configured in ``routing:`` the step does nothing (the control
headers are still removed by the ``headers`` step), so it can sit in the
shipped chain. The result is the message's route (``actions.set_route``); the milter hands it
to Postfix as the internal ``X-Mjfilter-Route`` header. Credentials of a
per-message smarthost go to the store, encrypted, for Postfix's SASL lookup;
they never reach a header, an event or a log line.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict

from mjfilter import hookimpl

log = logging.getLogger("mjfilter.routing")

WOULD_ROUTE_HEADER = "X-Mjfilter-Would-Route"


class Config(BaseModel):
    """``config:`` of a ``route`` step: nothing; the rules are in ``routing:``."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@hookimpl
def mjfilter_config_model() -> type[BaseModel]:
    return Config


@hookimpl
def mjfilter_capabilities(config: Config) -> list[str]:
    return ["add_header"]


@hookimpl
def mjfilter_message(txn: Any, actions: Any, config: Config, app: Any) -> None:
    """Set the route, or refuse a per-message smarthost the rules do not allow.

    ``RoutingError`` (a bad map entry, an SQL source that does not answer) and
    ``StoreUnavailable`` are not caught: the engine answers 451 and the client
    retries.
    """
    if not app.config.routing.enabled:
        return  # nothing configured routes mail: Postfix routes it, headers or not
    router = app.router
    decision = router.decide(txn, app.store)
    refusal = decision.refusal
    if refusal is not None:
        if refusal.code >= 500:
            actions.reject(refusal.text, code=refusal.code, status=refusal.status)
        else:
            actions.tempfail(refusal.text, code=refusal.code, status=refusal.status)
        return
    if decision.remember is not None and not txn.dry_run:
        router.vault.remember(app.store, *decision.remember)
    if decision.routed:
        actions.set_route(decision.nexthop, decision.rule, transport=decision.transport)
    if decision.would:
        would = f"{decision.would}; {decision.rule or 'no rule'}"
        actions.add_header(WOULD_ROUTE_HEADER, would)
        log.info("%s: sink mode: would route %s", txn.queue_id or "-", would)
    if decision.relay is not None:
        actions.note(f"smarthost {decision.relay.name or decision.relay.label or decision.relay.host}")
