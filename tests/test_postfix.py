"""Real Postfix on loopback: client -> Postfix (smtpd_milters = mjfilter run) -> aiosmtpd sink.

The Postfix side is configured with exactly what `mjfilter postfix-config` prints.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, eml, without_control_headers
from mjd import Daemon, postfix_main_cf
from rig import PostfixRig, Sink, smtp_send, smtp_send_many, wait_port

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists(),
                       reason="postfix is not installed: run make test, which installs it"),
]

CHAIN = [
    {"use": "headers", "name": "strip-control-headers"},
    {"use": "test-raise", "name": "raise-on-demand", "when": {"header": {"X-Test-Raise": "."}}},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("pf")
    with Sink() as sink:
        daemon = Daemon(base / "mj", CHAIN)
        main = postfix_main_cf(daemon.postfix_config("main"))
        main["disable_mime_output_conversion"] = "yes"  # compare 8-bit bodies byte for byte
        for k in ("milter_connect_timeout", "milter_command_timeout", "milter_content_timeout"):
            main.pop(k)  # keep the rig's short test timeouts
        pf = PostfixRig(base / "postfix", relay_port=sink.port, main_cf=main,
                        master_cf=daemon.postfix_config("master"))
        try:
            daemon.start()
            pf.start()
            yield sink, daemon, pf
        finally:
            pf.stop()
            daemon.stop()


@pytest.fixture
def w(world):
    sink, daemon, pf = world
    sink.clear()
    return world


def strip_received(header_block: bytes) -> bytes:
    """Drop the Received: field Postfix prepends (with its continuation lines)."""
    lines = header_block.split(b"\r\n")
    assert lines[0].startswith(b"Received: ")
    i = 1
    while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


def test_control_headers_removed_every_other_byte_unchanged(w):
    sink, daemon, pf = w
    data = eml("all-vendors.eml")
    assert smtp_send(pf.smtp_port, "app@shop.example", ["bob@example.org"], data).code == 250
    [got] = sink.wait_for(1)
    head_in, body_in = data.split(b"\r\n\r\n", 1)
    assert strip_received(got.header_block) == without_control_headers(head_in)
    assert got.body == body_in
    low = got.header_block.lower()
    for p in (b"x-mailjet-", b"x-mj-", b"x-mq-", b"x-smtpeter-", b"x-mxm-", b"x-mjfilter-"):
        assert p not in low
    assert b"s3cr3t-pass" not in got.data
    assert got.mail_from == "app@shop.example" and got.rcpt_tos == ["bob@example.org"]


def test_three_messages_on_one_connection_each_arrive_once(w):
    sink, daemon, pf = w
    items = []
    for i in range(3):
        data = eml("all-vendors.eml").replace(b"Message-ID: <2026", f"Message-ID: <{i}-2026".encode())
        items.append(("app@shop.example", [f"rcpt{i}@example.org"], data))
    replies = smtp_send_many(pf.smtp_port, items)
    assert [r.code for r in replies] == [250, 250, 250]
    got = sink.wait_for(3)
    time.sleep(0.5)  # would a duplicate arrive?
    got = sink.messages
    assert sorted(g.rcpt_tos[0] for g in got) == ["rcpt0@example.org", "rcpt1@example.org", "rcpt2@example.org"]
    for g in got:
        assert b"x-mq-" not in g.header_block.lower()
        assert len(g.headers("Message-ID")) == 1


def test_step_that_raises_gives_451_and_nothing_reaches_the_sink(w):
    sink, daemon, pf = w
    data = b"X-Test-Raise: yes\r\n" + eml("plain.eml")
    reply = smtp_send(pf.smtp_port, "app@shop.example", ["bob@example.org"], data)
    assert reply.code == 451 and reply.message.startswith("4.3.0 Temporary failure")
    assert pf.queue_empty()
    # a normal message afterwards still goes through, so nothing was stuck
    assert smtp_send(pf.smtp_port, "app@shop.example", ["bob@example.org"], eml("plain.eml")).code == 250
    [got] = sink.wait_for(1)
    assert b"Subject: plain" in got.data
    assert "raise-on-demand failed: RuntimeError: boom" in daemon.log()


def test_summary_log_line_carries_the_postfix_queue_id(w):
    sink, daemon, pf = w
    mark = pf.log_mark()
    data = eml("plain.eml").replace(b"<plain-1@", b"<queue-id-test@")
    assert smtp_send(pf.smtp_port, "app@shop.example", ["bob@example.org"], data).code == 250
    sink.wait_for(1)
    m = pf.wait_log(r"postfix/cleanup\[\d+\]: ([0-9A-F]+): message-id=<queue-id-test@shop.example>", since=mark)
    qid = m.group(1)
    deadline = time.monotonic() + 10
    while f"mjfilter.txn[{qid}]" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(x for x in daemon.log().splitlines() if f"mjfilter.txn[{qid}]" in x)
    assert "from=<app@shop.example> nrcpt=1" in line and "verdict=accept" in line


def test_reload_invalid_keeps_chain_valid_takes_effect_same_connection(w, tmp_path):
    sink, daemon, pf = w
    good = daemon.conf.read_text()
    smtp = smtplib.SMTP("127.0.0.1", pf.smtp_port, timeout=30)
    try:
        smtp.ehlo("client.test.invalid")
        smtp.sendmail("app@shop.example", ["r1@example.org"], eml("all-vendors.eml"))
        # an invalid file is refused with its location; the running chain stays
        daemon.write(good + "chain: []\n")
        r = daemon.mjfilter("reload")
        assert r.returncode == 2 and "duplicate key 'chain'" in r.stderr and f"{daemon.conf}:" in r.stderr
        smtp.sendmail("app@shop.example", ["r2@example.org"], eml("all-vendors.eml"))
        # a valid one takes effect for the next message on the same connection
        daemon.write(CHAIN + [{"use": "example-stamp", "config": {"value": "reloaded"}}])
        r = daemon.mjfilter("reload")
        assert r.returncode == 0, r.stderr
        assert "3 steps" in r.stdout
        smtp.sendmail("app@shop.example", ["r3@example.org"], eml("all-vendors.eml"))
        smtp.quit()
        got = {g.rcpt_tos[0]: g for g in sink.wait_for(3)}
        assert got["r1@example.org"].headers("X-Stamp") == []
        assert got["r2@example.org"].headers("X-Stamp") == []
        assert b"x-mq-" not in got["r2@example.org"].header_block.lower()
        assert got["r3@example.org"].headers("X-Stamp") == ["reloaded"]
        status = daemon.mjfilter("status")
        assert '"generation": 1' in status.stdout
    finally:
        daemon.write(good)
        assert daemon.mjfilter("reload").returncode == 0


def test_no_nagle_stall_over_inet(w):
    """One SMTP session over an inet: milter: a Nagle/delayed-ACK stall would cap it near 23 msgs/s."""
    sink, daemon, pf = w
    assert daemon.listen.startswith("inet:")
    smtp = smtplib.SMTP("127.0.0.1", pf.smtp_port, timeout=30)
    smtp.ehlo("client.test.invalid")
    n = 60
    t0 = time.perf_counter()
    for i in range(n):
        smtp.sendmail("app@shop.example", [f"s{i}@example.org"], eml("plain.eml"))
    rate = n / (time.perf_counter() - t0)
    smtp.quit()
    sink.wait_for(n)
    assert rate > 50, f"{rate:.0f} msgs/s on one session: the milter stalls (expected several hundred)"


def test_with_mjfilter_stopped_postfix_answers_4xx(w):
    sink, daemon, pf = w
    assert daemon.stop() == 0  # SIGTERM: clean exit
    try:
        reply = smtp_send(pf.smtp_port, "app@shop.example", ["bob@example.org"], eml("all-vendors.eml"))
        assert 400 <= reply.code < 500, reply
        time.sleep(0.5)
        assert sink.messages == [] and pf.queue_empty()
    finally:
        daemon.start()
    assert smtp_send(pf.smtp_port, "app@shop.example", ["bob@example.org"], eml("plain.eml")).code == 250
    sink.wait_for(1)


def test_make_run_brings_up_a_milter_that_postfix_uses(tmp_path):
    """`make run` with the shipped configuration, used by a real Postfix, stopped by SIGTERM."""
    import socket

    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8894)) == 0:
            pytest.skip("something already listens on 127.0.0.1:8894 (a running `make run`?)")
    log = open(tmp_path / "make-run.log", "wb")
    proc = subprocess.Popen(["make", "-s", "run"], cwd=ROOT, stdout=log, stderr=log, start_new_session=True,
                            env={**os.environ, "MAKEFLAGS": ""})
    try:
        wait_port("127.0.0.1", 8894, timeout=120)
        main = postfix_main_cf((ROOT / "contrib" / "postfix" / "main.cf").read_text())  # the shipped snippet
        with Sink() as sink, PostfixRig(tmp_path / "pf", relay_port=sink.port, main_cf=main) as pf:
            assert smtp_send(pf.smtp_port, "app@shop.example", ["bob@example.org"], eml("all-vendors.eml")).code == 250
            [got] = sink.wait_for(1)
            assert b"x-mailjet" not in got.header_block.lower()
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        proc.wait(30)
        log.close()
    out = (tmp_path / "make-run.log").read_text()
    assert "ready" in out and "INFO mjfilter[-]: stopped" in out and "Traceback" not in out, out



def test_unix_socket_milter_is_reachable_by_postfix(tmp_path):
    """Over unix: the socket gets group postfix, so Postfix's smtpd (user postfix) can connect."""
    import grp as grp_

    from rig import make_traversable

    sock = tmp_path / "run" / "mjfilter.sock"
    sock.parent.mkdir()
    make_traversable(sock.parent)
    with Sink() as sink:
        daemon = Daemon(tmp_path / "mj", CHAIN, milter={"listen": f"unix:{sock}"}).start()
        try:
            st = sock.stat()
            assert grp_.getgrgid(st.st_gid).gr_name == "postfix" and oct(st.st_mode & 0o777) == "0o660"
            main = postfix_main_cf(daemon.postfix_config("main"))
            assert main["smtpd_milters"] == f"unix:{sock}"
            with PostfixRig(tmp_path / "pf", relay_port=sink.port, main_cf=main) as pf:
                assert smtp_send(pf.smtp_port, "app@shop.example", ["bob@example.org"],
                                 eml("all-vendors.eml")).code == 250
                [got] = sink.wait_for(1)
                assert b"x-mailjet" not in got.header_block.lower()
        finally:
            daemon.stop()
