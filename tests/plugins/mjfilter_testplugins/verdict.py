"""``test-verdict``: gives the configured verdict."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from mjfilter import hookimpl


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    verdict: Literal["reject", "tempfail", "discard", "quarantine"]
    code: int | None = None
    status: str | None = None
    text: str = "refused by test-verdict"


@hookimpl
def mjfilter_config_model() -> type[BaseModel]:
    return Config


@hookimpl
def mjfilter_capabilities(config: Config) -> list[str]:
    return ["quarantine"] if config.verdict == "quarantine" else []


@hookimpl
def mjfilter_message(txn: Any, actions: Any, config: Config, app: Any) -> None:
    extra = {k: v for k, v in (("code", config.code), ("status", config.status)) if v is not None}
    if config.verdict == "reject":
        actions.reject(config.text, **extra)
    elif config.verdict == "tempfail":
        actions.tempfail(config.text, **extra)
    elif config.verdict == "discard":
        actions.discard(config.text)
    else:
        actions.quarantine(config.text)
