"""The normalised ``Directives`` value: what a message asks of the relay.

Every vendor dialect (``mjfilter.dialects``) reads its own control headers into
this one shape; plugins read ``txn.directives`` and never raw vendor headers.
A field left at its default (``None``, empty) means "the message did not say":
a plugin then applies its configured default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Problem:
    """A control header whose value could not be used.

    ``header`` is the header name as received, ``value`` a short excerpt of the
    value (CR/LF removed, at most 80 characters; never a credential), ``reason``
    says what is wrong. Plugins may act on problems (for instance reject a
    message whose template variables are not valid JSON); the engine never
    crashes on them.
    """

    header: str
    value: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"header": self.header, "value": self.value, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Smarthost:
    """A next hop asked for by the message (MailerQ ``x-mq-smarthost-*``)."""

    hostname: str
    port: int = 25
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # Behind Postfix: a token for username and password, kept by mjfilter (see routing.vault)
    credential_ref: str | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """Public view: the password is never shown, only whether there is one."""
        return {
            "hostname": self.hostname,
            "port": self.port,
            "username": self.username,
            "password": "***" if self.password or self.credential_ref else None,
        }


@dataclass(slots=True)
class Directives:
    """Everything the control headers of a message asked for.

    ``sources`` maps a field name to the header that set it (for traces and
    ``mjfilter check``); ``problems`` lists the values that were unusable.
    """

    # Mailjet X-Mailjet-Campaign (stats grouping; events carry it as customcampaign)
    campaign: str | None = None
    # Mailjet X-Mailjet-DeduplicateCampaign (only meaningful with a campaign)
    dedup: bool = False
    # Mailjet X-MJ-CustomID / X-MJ-EventPayload: echoed on every event
    custom_id: str | None = None
    payload: str | None = None
    # open / click tracking: None = use the configured default
    track_open: bool | None = None
    track_click: bool | None = None
    # SMTPeter x-smtpeter-trackbounces: envelope sender becomes a relay bounce address
    track_bounces: bool | None = None
    # Mailjet X-Mailjet-Prio 0..3
    priority: int | None = None
    # Mailjet templating
    template_language: bool = False
    template_id: str | None = None
    template_vars: dict[str, Any] | None = None
    template_error_reporting: str | None = None
    template_error_deliver: bool | None = None
    # tags (MailerQ x-mq-tag, Maxemail X-Mxm-Tag), in order, no duplicates
    tags: tuple[str, ...] = ()
    # MailerQ per-message smarthost
    smarthost: Smarthost | None = None
    # SMTPeter x-smtpeter-inlinecss, MailerQ x-mq-inlinecss
    inline_css: bool | None = None
    # Maxemail X-Mxm-Flags bit 4 (check the unsubscribe list), bit 8 (skip the bounce list)
    check_unsubscribe: bool | None = None
    ignore_bounce_list: bool | None = None
    # other x-mq-* headers, as MailerQ message properties (name without prefix -> value)
    properties: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (credentials masked), for ``mjfilter check --json``."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "smarthost":
                value = value.as_dict() if value else None
            elif name == "problems":
                value = [p.as_dict() for p in value]
            elif name == "tags":
                value = list(value)
            out[name] = value
        return out
