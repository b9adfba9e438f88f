"""The milter front end through pymilter's TestCtx (no MTA): callbacks, negotiation, actions."""

from __future__ import annotations

import logging
import socket
from typing import Any

import Milter
import pytest
from Milter import testctx

from conftest import eml
from mjfilter.frontends.milter import MilterSession
from mjfilter.model import Message


class RecordingCtx(testctx.TestCtx):
    """TestCtx that records every action call exactly as the MTA would receive it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []
        self._stage = -1

    def addheader(self, field: str, value: str, idx: int) -> None:
        self.calls.append(("addheader", field, value, idx))

    def chgheader(self, field: str, idx: int, value: str | None) -> None:
        self.calls.append(("chgheader", field, idx, value))

    def addrcpt(self, rcpt: str, params: Any) -> None:
        self.calls.append(("addrcpt", rcpt, params))

    def delrcpt(self, rcpt: str) -> None:
        self.calls.append(("delrcpt", rcpt))

    def replacebody(self, chunk: bytes) -> None:
        self.calls.append(("replacebody", chunk))

    def chgfrom(self, sender: str, params: Any = None) -> None:
        self.calls.append(("chgfrom", sender, params))

    def quarantine(self, reason: str) -> None:
        self.calls.append(("quarantine", reason))


class Client:
    """Drives one MilterSession the way libmilter calls it for Postfix."""

    def __init__(self, app: Any) -> None:
        self.ctx = RecordingCtx()
        self.session = MilterSession(app)
        self.session._setctx(self.ctx)
        self.opts = list(testctx.TestCtx.default_opts)
        self.session.negotiate(self.opts)
        self.session.connect("client.example", socket.AF_INET, ("192.0.2.7", 40000))
        self.session.hello("client.example")

    def send(self, data: bytes, sender: str, rcpts: list[str], macros: dict[str, str] | None = None) -> int:
        self.ctx.calls.clear()
        self.ctx._reply = None
        self.ctx._macros = dict(macros or {})
        s = self.session
        s.envfrom(f"<{sender}>", "SIZE=100")
        for r in rcpts:
            s.envrcpt(f"<{r}>")
        s.data()
        head, _, body = data.partition(b"\r\n\r\n")
        parsed = Message.from_bytes(head + b"\r\n\r\n")
        for name, value in parsed.headers:
            s.header(name, value)
        s.eoh()
        for i in range(0, len(body), 1000):
            s.body(body[i:i + 1000])
        return s.eom()


def test_negotiates_only_declared_actions(make_app):
    c = Client(make_app([{"use": "headers"}]))
    assert c.opts[0] == Milter.CHGHDRS | Milter.ADDHDRS
    # every callback but DATA and end-of-message is noreply
    for flag in (Milter.P_NR_CONN, Milter.P_NR_HELO, Milter.P_NR_MAIL, Milter.P_NR_RCPT, Milter.P_NR_HDR,
                 Milter.P_NR_EOH, Milter.P_NR_BODY):
        assert c.opts[1] & flag
    assert not c.opts[1] & Milter.P_NODATA and not c.opts[1] & Milter.P_NR_DATA


def test_control_headers_are_deleted_highest_index_first(make_app):
    c = Client(make_app([{"use": "headers"}]))
    assert c.send(eml("all-vendors.eml"), "app@shop.example", ["bob@example.org"]) == Milter.CONTINUE
    dels = [(f.lower(), i) for op, f, i, v in (x for x in c.ctx.calls if x[0] == "chgheader")]
    assert dels.index(("x-mxm-tag", 2)) < dels.index(("x-mxm-tag", 1))
    assert all(v is None for *_, v in (x for x in c.ctx.calls if x[0] == "chgheader"))
    assert len(dels) == 19  # every control header line of the fixture, one call each
    assert {f.lower() for f, _ in dels} >= {"x-mailjet-campaign", "x-mq-smarthost-password", "x-mjfilter-route"}


def test_every_edit_kind_reaches_the_mta(make_app):
    app = make_app([{"use": "test-edits", "config": {
        "new_sender": "bounce@relay.example", "add_recipient": "audit@example.org",
        "delete_recipient": "bob@example.org", "body": "new body\n", "subject": "new subject",
        "insert_first": "top", "add": "bottom"}}])
    c = Client(app)
    c.send(eml("plain.eml"), "app@shop.example", ["bob@example.org", "carol@example.org"])
    assert ("addheader", "X-First", "top", 0) in c.ctx.calls
    assert ("addheader", "X-Added", "bottom", -1) in c.ctx.calls
    assert ("chgheader", "Subject", 1, "new subject") in c.ctx.calls
    assert ("replacebody", b"new body\r\n") in c.ctx.calls
    assert ("chgfrom", "<bounce@relay.example>", None) in c.ctx.calls
    assert ("addrcpt", "<audit@example.org>", None) in c.ctx.calls
    assert ("delrcpt", "<bob@example.org>") in c.ctx.calls


@pytest.mark.parametrize("verdict,rc,reply", [
    ({"verdict": "reject", "text": "100% no"}, Milter.REJECT, ("550", "5.7.1", "100%% no")),
    ({"verdict": "tempfail", "text": "later"}, Milter.TEMPFAIL, ("451", "4.3.0", "later")),
    ({"verdict": "reject", "code": 554, "status": "5.7.0", "text": "x"}, Milter.REJECT, ("554", "5.7.0", "x")),
    ({"verdict": "discard"}, Milter.DISCARD, None),
])
def test_verdicts_map_to_milter_replies(make_app, verdict, rc, reply):
    c = Client(make_app([{"use": "test-verdict", "config": verdict}]))
    assert c.send(eml("plain.eml"), "a@b.example", ["c@d.example"]) == rc
    assert c.ctx._reply == reply
    assert not c.ctx.calls


def test_quarantine(make_app):
    c = Client(make_app([{"use": "test-verdict", "config": {"verdict": "quarantine", "text": "look at it"}}]))
    assert c.send(eml("plain.eml"), "a@b.example", ["c@d.example"]) == Milter.CONTINUE
    assert ("quarantine", "look at it") in c.ctx.calls
    assert c.opts[0] & Milter.QUARANTINE


def test_step_error_answers_451_generic(make_app, caplog):
    c = Client(make_app([{"use": "test-raise", "config": {"message": "internal detail"}}]))
    with caplog.at_level(logging.ERROR):
        rc = c.send(eml("plain.eml"), "a@b.example", ["c@d.example"], {"i": "ABC123"})
    assert rc == Milter.TEMPFAIL
    assert c.ctx._reply == ("451", "4.3.0", "Temporary failure, please try again later")
    assert "internal detail" in caplog.text


def test_fresh_transaction_per_message_and_after_abort(make_app):
    app = make_app([{"use": "example-stamp"}])
    seen: list[Any] = []
    c = Client(app)
    c.send(eml("plain.eml"), "a@b.example", ["one@example.org"])
    seen.append(c.session.txn)
    # an aborted transaction (RSET) leaves nothing behind
    c.session.envfrom("<x@y.example>")
    c.session.envrcpt("<stale@example.org>")
    c.session.header("X-Stale", b"1")
    c.session.abort()
    assert c.session.txn is None
    c.send(eml("plain.eml"), "b@b.example", ["two@example.org"])
    step = app.runtime.chain.steps[0]
    assert step.config._ended == ["accept", "accept"]
    assert app.runtime.active == 0


def test_summary_line_has_queue_id_and_no_secrets(make_app):
    import io

    from mjfilter.logsetup import setup_logging

    stream = io.StringIO()
    setup_logging("info", stream)
    try:
        c = Client(make_app([{"use": "headers"}]))
        c.send(eml("all-vendors.eml"), "app\r\nforged@shop.example", ["bob@example.org"], {"i": "4XyZ12"})
    finally:
        logging.getLogger().handlers.clear()
    lines = [x for x in stream.getvalue().splitlines() if "mjfilter.txn" in x]
    assert len(lines) == 1
    line = lines[0]
    assert "mjfilter.txn[4XyZ12]:" in line
    assert "from=<app\\r\\nforged@shop.example>" in line  # CR/LF escaped, one line
    assert "nrcpt=1" in line and "verdict=accept" in line and "headers=ok" in line
    assert "s3cr3t" not in stream.getvalue() and "Dear Bob" not in stream.getvalue()


def test_headers_keep_8bit_bytes(make_app):
    app = make_app([{"use": "example-stamp"}])
    c = Client(app)
    c.send(eml("all-vendors.eml"), "app@shop.example", ["bob@example.org"])
    # the session saw the raw UTF-8 bytes, not a decoded or re-encoded form
    assert ("addheader", "X-Stamp", "mjfilter", -1) in c.ctx.calls


def test_oversized_message_is_refused_552(make_app):
    c = Client(make_app([], milter={"max_message_bytes": 2048}))
    rc = c.send(eml("plain.eml") + b"y" * 5000, "a@b.example", ["c@d.example"])
    assert rc == Milter.REJECT and c.ctx._reply[0] == "552"


def test_extra_copies_are_reinjected_before_the_answer(make_app):
    from rig import Sink

    with Sink() as sink:
        app = make_app([{"use": "test-copies"}], reinject={"host": "127.0.0.1", "port": sink.port})
        c = Client(app)
        rc = c.send(eml("plain.eml"), "a@b.example", ["one@example.org", "two@example.org", "three@example.org"])
        assert rc == Milter.CONTINUE
        got = sink.wait_for(2, timeout=10)
    assert sorted(r.rcpt_tos[0] for r in got) == ["three@example.org", "two@example.org"]
    assert all(b"X-Copy-For: " + r.rcpt_tos[0].encode() in r.data for r in got)
    assert ("delrcpt", "<two@example.org>") in c.ctx.calls


def test_reinjection_failure_answers_451(make_app):
    from rig import free_port

    app = make_app([{"use": "test-copies"}], reinject={"host": "127.0.0.1", "port": free_port(), "timeout": 2})
    c = Client(app)
    rc = c.send(eml("plain.eml"), "a@b.example", ["one@example.org", "two@example.org"])
    assert rc == Milter.TEMPFAIL and c.ctx._reply[:2] == ("451", "4.3.0")
    assert not [x for x in c.ctx.calls if x[0] == "delrcpt"]  # nothing applied to the live message
