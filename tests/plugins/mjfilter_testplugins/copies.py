"""``test-copies``: one extra copy per recipient, with a per-recipient header (reinjection)."""

from typing import Any

from mjfilter import hookimpl
from mjfilter.model import Message


@hookimpl
def mjfilter_message(txn: Any, actions: Any, config: Any, app: Any) -> None:
    for rcpt in list(txn.envelope.recipients)[1:]:
        copy = Message(list(txn.message.headers) + [("X-Copy-For", rcpt.encode())], txn.message.body)
        actions.add_delivery(txn.envelope.sender, [rcpt], copy)
        actions.delete_recipient(rcpt)


@hookimpl
def mjfilter_capabilities(config: Any) -> list[str]:
    return ["delete_recipient"]
