"""Example third-party plugin: stamp a header on every message.

Shows every mjfilter hook. State lives on the step's own config object (one per
step), never in a module global, so two steps using this plugin never mix.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from mjfilter import hookimpl


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    header: str = Field("X-Stamp", pattern=r"^[!-9;-~]+$")
    value: str = Field("mjfilter", min_length=1, max_length=200)
    with_campaign: bool = False

    # lifecycle bookkeeping, visible to tests and `mjfilter check`
    _started: bool = PrivateAttr(False)
    _stopped: bool = PrivateAttr(False)
    _ended: list[str] = PrivateAttr(default_factory=list)


@hookimpl
def mjfilter_config_model() -> type[BaseModel]:
    return Config


@hookimpl
def mjfilter_capabilities(config: Config) -> list[str]:
    return ["add_header"]


@hookimpl
def mjfilter_startup(app: Any, config: Config, step: str) -> None:
    config._started = True


@hookimpl
def mjfilter_message(txn: Any, actions: Any, config: Config, app: Any) -> None:
    value = config.value
    if config.with_campaign and txn.directives.campaign:
        value = f"{value}; campaign={txn.directives.campaign}"
    actions.add_header(config.header, value)


@hookimpl
def mjfilter_transaction_end(txn: Any, outcome: Any, config: Config, app: Any) -> None:
    config._ended.append(outcome.verdict)


@hookimpl
def mjfilter_shutdown(app: Any, config: Config, step: str) -> None:
    config._stopped = True
