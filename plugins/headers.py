"""``headers``: remove every control header before the message is queued.

Strips every instance, in any case, folded or not, of ``X-Mailjet-*``,
``X-MJ-*``, ``x-mq-*``, ``x-smtpeter-*``, ``X-Mxm-*`` and mjfilter's own
internal ``X-Mjfilter-*`` headers (which must never be accepted from outside:
they steer routing). ``extra`` adds name patterns; ``keep`` keeps vendor
headers for a site that relays on to that vendor.
"""

from __future__ import annotations

import re
from fnmatch import translate
from typing import Any
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from mjfilter import hookimpl
from mjfilter.dialects import CONTROL_HEADER_PREFIXES, INTERNAL_PREFIX


class Config(BaseModel):
    """``config:`` of a ``headers`` step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    extra: list[str] = Field(default_factory=list,
                             description="more header name patterns to remove (shell globs, any case)")
    keep: list[str] = Field(default_factory=list,
                            description="control header patterns to keep, e.g. 'X-Mailjet-*' when relaying to Mailjet")

    @field_validator("extra", "keep")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or any(c in p for c in ": \t\r\n"):
                raise ValueError(f"{p!r} is not a header name pattern")
        return v

    @field_validator("keep")
    @classmethod
    def _not_internal(cls, v: list[str]) -> list[str]:
        for p in v:
            if _glob(p)(INTERNAL_PREFIX + "route"):
                raise ValueError(f"{p!r} would keep mjfilter's internal headers, which are always removed")
        return v

    _strip: Callable[[str], bool] = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        self._strip = self.predicate()  # compiled once per step, never per message

    @property
    def strip(self) -> Callable[[str], bool]:
        return self._strip

    def predicate(self) -> Callable[[str], bool]:
        """The name test: True for a header to remove."""
        prefixes = CONTROL_HEADER_PREFIXES
        extra = _any(self.extra)
        keep = _any(self.keep)

        def strip(name: str) -> bool:
            lname = name.lower()
            if lname.startswith(INTERNAL_PREFIX):
                return True
            if lname.startswith(prefixes) or extra(lname):
                return not keep(lname)
            return False

        return strip


def _glob(pattern: str) -> Callable[[str], bool]:
    return re.compile(translate(pattern.lower())).match  # type: ignore[return-value]


def _any(patterns: list[str]) -> Callable[[str], bool]:
    if not patterns:
        return lambda name: False
    rx = re.compile("|".join(f"(?:{translate(p.lower())})" for p in patterns))
    return lambda name: rx.match(name) is not None


@hookimpl
def mjfilter_config_model() -> type[BaseModel]:
    return Config


@hookimpl
def mjfilter_capabilities(config: Config) -> list[str]:
    return ["change_header"]


@hookimpl
def mjfilter_message(txn: Any, actions: Any, config: Config, app: Any) -> None:
    removed = actions.delete_headers_where(config.strip)
    if removed:
        actions.note(f"removed {removed} control header{'s' if removed != 1 else ''}")
