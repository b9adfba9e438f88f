"""Every hook a mjfilter plugin can implement.

A plugin is a module (or object) registered under the ``mjfilter.plugins``
entry-point group. The chain calls a plugin's hooks only for the steps of the
YAML ``chain`` that ``use`` it, in YAML order, one step at a time; the same
plugin may back several steps, each with its own ``config``.

Hooks that return a value may return an awaitable instead; the engine awaits it
on its event loop (pluggy itself never awaits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from collections.abc import Iterable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from pydantic import BaseModel

    from .actions import Actions
    from .app import App
    from .chain import Outcome
    from .model import Transaction

hookspec = pluggy.HookspecMarker("mjfilter")


@hookspec(firstresult=True)
def mjfilter_config_model() -> "type[BaseModel] | None":
    """Return the pydantic model that validates this plugin's ``config:`` block.

    Stops at the first non-None result. Without it a step must have no
    ``config``. Make the model strict (``extra="forbid"``) so that a typo in the
    YAML is reported with ``file:line:col`` before the daemon starts.

    :return: a ``pydantic.BaseModel`` subclass, or None.
    """


@hookspec(firstresult=True)
def mjfilter_capabilities(config: Any) -> "Iterable[str] | None":
    """Declare which kinds of edit this step may make.

    Stops at the first non-None result. The milter front end negotiates only
    the actions the configured steps declare, and ``Actions`` refuses an
    undeclared edit. Names: ``add_header``, ``change_header``,
    ``replace_body``, ``change_sender``, ``add_recipient``,
    ``delete_recipient``, ``quarantine``.

    :param config: the step's validated configuration (None without a model).
    :return: an iterable of capability names, or None for "no edits".
    """


@hookspec
def mjfilter_startup(app: "App", config: Any, step: str) -> None:
    """Prepare a step: called once per step when a chain is built.

    Runs at start and on every reload, before the new chain takes traffic.
    Compile what can be compiled here, never per message. Raising here makes a
    reload fail and keeps the running chain.

    :param app: the running application (store, state directory, settings).
    :param config: the step's validated configuration.
    :param step: the step's name in the chain.
    """


@hookspec
def mjfilter_message(txn: "Transaction", actions: "Actions", config: Any, app: "App") -> "Any":
    """Process one message: the work of a chain step.

    Called at end-of-message with the whole message, in chain order, unless the
    step's ``when:`` rule does not match or an earlier step gave a terminal
    verdict. Read ``txn`` (envelope, headers, body, ``txn.directives``); change
    it only through ``actions``, whose edits later steps see at once. Raising
    answers the client 451 4.3.0 (``on_error: tempfail``, the default) or skips
    the step with its edits undone (``on_error: skip``).

    :param txn: the transaction: ``connection``, ``envelope``, ``message``,
        ``directives``, ``queue_id``, ``auth_user``, ``state``.
    :param actions: edits, verdicts, route, extra deliveries and events.
    :param config: the step's validated configuration.
    :param app: the running application.
    :return: None, or an awaitable the engine awaits.
    """


@hookspec
def mjfilter_transaction_end(txn: "Transaction", outcome: "Outcome", config: Any, app: "App") -> None:
    """Learn how a transaction ended, once the front end has answered the MTA.

    Called for every step that ran, also when the chain tempfailed or the
    front end could not apply the outcome (``outcome.verdict`` then says
    ``tempfail``), and when the client aborted after the chain ran. Use it to
    release what ``mjfilter_message`` reserved. Errors are logged, never
    change the reply (it is already sent).

    :param txn: the transaction.
    :param outcome: what was decided and answered.
    :param config: the step's validated configuration.
    :param app: the running application.
    """


@hookspec
def mjfilter_shutdown(app: "App", config: Any, step: str) -> None:
    """Release a step's resources: called when a chain is replaced or the daemon stops.

    :param app: the running application.
    :param config: the step's validated configuration.
    :param step: the step's name in the chain.
    """
