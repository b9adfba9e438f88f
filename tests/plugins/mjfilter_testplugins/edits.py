"""``test-edits``: makes one edit of every kind, so the front ends can be checked for each."""

from typing import Any

from pydantic import BaseModel, ConfigDict

from mjfilter import hookimpl


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    new_sender: str | None = None
    add_recipient: str | None = None
    delete_recipient: str | None = None
    body: str | None = None
    subject: str | None = None
    insert_first: str | None = None  # value of an X-First header inserted at the top
    add: str | None = None  # value of an X-Added header appended


@hookimpl
def mjfilter_config_model() -> type[BaseModel]:
    return Config


@hookimpl
def mjfilter_capabilities(config: Config) -> list[str]:
    return ["add_header", "change_header", "replace_body", "change_sender", "add_recipient", "delete_recipient"]


@hookimpl
def mjfilter_message(txn: Any, actions: Any, config: Config, app: Any) -> None:
    if config.insert_first is not None:
        actions.insert_header(0, "X-First", config.insert_first)
    if config.add is not None:
        actions.add_header("X-Added", config.add)
    if config.subject is not None:
        actions.change_header("Subject", config.subject)
    if config.body is not None:
        actions.replace_body(config.body.encode().replace(b"\n", b"\r\n"))
    if config.new_sender is not None:
        actions.change_sender(config.new_sender)
    if config.add_recipient is not None:
        actions.add_recipient(config.add_recipient)
    if config.delete_recipient is not None:
        actions.delete_recipient(config.delete_recipient)
