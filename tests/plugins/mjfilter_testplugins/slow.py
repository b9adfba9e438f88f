"""``test-slow``: sleeps in mjfilter_message, so transactions are in flight when a test needs them."""

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mjfilter import hookimpl


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ms: float = Field(50.0, ge=0, le=60000)


@hookimpl
def mjfilter_config_model() -> type[BaseModel]:
    return Config


@hookimpl
def mjfilter_message(txn: Any, actions: Any, config: Config, app: Any) -> None:
    time.sleep(config.ms / 1000)
