"""``test-raise``: raises in mjfilter_message (optionally only when a header is present)."""

from typing import Any

from pydantic import BaseModel, ConfigDict

from mjfilter import hookimpl


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str = "boom"
    add_header_first: bool = False  # make an edit before raising (tests on_error: skip undo)


@hookimpl
def mjfilter_config_model() -> type[BaseModel]:
    return Config


@hookimpl
def mjfilter_capabilities(config: Config) -> list[str]:
    return ["add_header"]


@hookimpl
def mjfilter_message(txn: Any, actions: Any, config: Config, app: Any) -> None:
    if config.add_header_first:
        actions.add_header("X-Before-Raise", "1")
    raise RuntimeError(config.message)
