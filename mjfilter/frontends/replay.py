"""Replay: run the chain on an .eml file plus an envelope, with no MTA.

The same path ``mjfilter check`` and the fixture tests use. The message is split
into header fields the way an MTA hands them to a milter, so the chain sees
exactly what it would see behind Postfix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..actions import TEMPFAIL_REPLY
from ..app import App
from ..chain import Outcome
from ..model import Connection, Envelope, Message, Transaction


@dataclass(slots=True)
class Replay:
    txn: Transaction
    outcome: Outcome
    ms: float


def make_transaction(data: bytes, sender: str, recipients: list[str], auth_user: str | None = None,
                     client_ip: str | None = "127.0.0.1", helo: str | None = "localhost",
                     queue_id: str | None = None, spool_bytes: int | None = None) -> Transaction:
    conn = Connection(hostname=f"[{client_ip}]" if client_ip else "localhost", client_addr=client_ip, helo=helo)
    message = Message.from_bytes(data, spool_bytes) if spool_bytes is not None else Message.from_bytes(data)
    macros = {"{auth_authen}": auth_user} if auth_user else {}
    return Transaction(conn, Envelope(sender, list(recipients)), message, macros=macros,
                       queue_id=queue_id, auth_user=auth_user)


def replay(app: App, data: bytes, sender: str, recipients: list[str], auth_user: str | None = None,
           client_ip: str | None = "127.0.0.1", commit: bool = True) -> Replay:
    """Run the current chain on one message and end the transaction as an MTA would.

    ``commit=False`` is a dry run: the steps are told the MTA did not take the
    message (so dedup releases what it reserved, nothing is counted, no event is
    kept), while the returned outcome still says what would have happened.
    """
    rt = app.acquire()
    try:
        txn = make_transaction(data, sender, recipients, auth_user, client_ip,
                               spool_bytes=rt.config.milter.body_spool_bytes)
        txn.dry_run = not commit
        t0 = time.perf_counter()
        outcome = app.process(txn, rt)
        ms = (time.perf_counter() - t0) * 1e3
        if commit:
            app.end(txn, outcome, rt)
        else:
            app.end(txn, Outcome("tempfail", TEMPFAIL_REPLY, steps_run=outcome.steps_run), rt)
    finally:
        app.release(rt)
    return Replay(txn, outcome, ms)
