"""Smoke test of the test rig itself: a real Postfix relaying to a recording sink."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from rig import PostfixRig, Reply, Sink, free_port, smtp_send, smtp_send_many, wait_port

pytestmark = pytest.mark.postfix

BODY = (
    b"first line\r\n"
    b".a line that starts with a dot (dot-stuffed on the wire)\r\n"
    b"..two dots\r\n"
    b"trailing spaces   \r\n"
    b"\ttab\r\n"
    b"\r\n"
    b"8bit: caf\xc3\xa9\r\n"
    b"last line\r\n"
)


def message(subject: str) -> bytes:
    return (
        b"From: Alice <alice@shop.example>\r\n"
        b"To: Bob <bob@example.org>\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + BODY
    )


def queue_id(reply: Reply) -> str:
    m = re.search(r"queued as ([0-9A-Za-z]+)", reply.message)
    assert m, reply
    return m.group(1)


def test_postfix_relays_to_sink_and_retries_when_sink_comes_back(tmp_path: Path) -> None:
    sink = Sink().start()
    try:
        with PostfixRig(tmp_path, relay_port=sink.port) as pf:
            wait_port("127.0.0.1", pf.smtp_port, timeout=5)

            # 1. straight through, body intact, envelope kept, exactly once
            reply = smtp_send(pf.smtp_port, "alice@shop.example", ["bob@example.org"], message("one"))
            assert reply.code == 250, reply
            qid = queue_id(reply)
            [got] = sink.wait_for(1, timeout=20)
            assert got.mail_from == "alice@shop.example"
            assert got.rcpt_tos == ["bob@example.org"]
            assert got.body == BODY
            assert got.headers("subject") == ["one"]
            assert f"by rig.test.invalid (Postfix) with ESMTP id {qid}" in got.headers("received")[0].replace("\t", " ")
            pf.wait_log(rf"{qid}: removed", timeout=20)
            assert pf.queue_empty()
            assert len(sink.messages) == 1

            # 2. sink down: accepted, then deferred in the queue
            sink.stop()
            mark = pf.log_mark()
            reply = smtp_send(pf.smtp_port, "alice@shop.example", ["carol@example.net"], message("two"))
            assert reply.code == 250, reply
            qid = queue_id(reply)
            pf.wait_log(rf"{qid}: .*status=deferred", timeout=20, since=mark)
            assert qid in pf.queue()
            assert not pf.queue_empty()

            # 3. a new sink on the same port; flush delivers it
            sink = Sink(port=sink.port).start()
            pf.flush()
            [got] = sink.wait_for(1, timeout=20)
            assert got.rcpt_tos == ["carol@example.net"] and got.body == BODY
            assert got.headers("subject") == ["two"]
            pf.wait_log(rf"{qid}: removed", timeout=20, since=mark)
            pf.wait_queue_empty(timeout=10)
            assert len(sink.messages) == 1
        assert not pf.running()
        assert pf._processes() == []
    finally:
        sink.stop()


def test_smtp_send_reports_refusals_instead_of_raising(tmp_path: Path) -> None:
    with Sink() as sink, PostfixRig(
        tmp_path,
        relay_port=sink.port,
        main_cf={"smtpd_recipient_restrictions": "check_recipient_access inline:{ {nobody@example.org=REJECT no such user} }"},
    ) as pf:
        replies = smtp_send_many(
            pf.smtp_port,
            [
                ("alice@shop.example", ["nobody@example.org"], message("refused")),
                ("alice@shop.example", ["nobody@example.org", "bob@example.org"], message("half")),
                ("alice@shop.example", ["dave@example.org"], message("ok")),
            ],
        )
        assert [r.code for r in replies] == [554, 250, 250], replies
        assert "no such user" in replies[0].message
        msgs = sink.wait_for(2, timeout=20)
        assert sorted(m.rcpt_tos[0] for m in msgs) == ["bob@example.org", "dave@example.org"]
    nobody = free_port()
    assert smtp_send(nobody, "a@b.example", ["c@d.example"], b"\r\n").code == -1


def test_no_postfix_process_left_behind(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs last: no process of any rig of this session (MAIL_CONFIG under basetemp) is alive."""
    base = str(tmp_path_factory.getbasetemp()).encode()
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(b"MAIL_CONFIG=" + base) for v in env):
            left.append(pid)
    assert left == []
