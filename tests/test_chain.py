"""The chain on .eml fixtures with no MTA, through the path `mjfilter check` uses."""

from __future__ import annotations

import re

import pytest

from conftest import eml, without_control_headers
from mjfilter.actions import ActionError, Actions, ChangeHeader, Reply
from mjfilter.frontends.replay import make_transaction, replay

HEADERS = [{"use": "headers"}]


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


def test_headers_step_strips_every_control_header_and_keeps_every_other_byte(make_app):
    data = eml("all-vendors.eml")
    r = replay(make_app(HEADERS), data, "app@shop.example", ["bob@example.org"])
    assert r.outcome.verdict == "accept"
    [delivery] = r.outcome.all_deliveries(r.txn)
    out = delivery.message.as_bytes()
    assert header_block(out) == without_control_headers(header_block(data))
    assert out.split(b"\r\n\r\n", 1)[1] == data.split(b"\r\n\r\n", 1)[1]  # body byte for byte
    for name in (b"x-mailjet", b"x-mj-", b"x-mq-", b"x-smtpeter", b"x-mxm", b"x-mjfilter"):
        assert name not in header_block(out).lower()
    assert b"s3cr3t-pass" not in out


def test_directives_are_read_before_the_headers_go(make_app):
    r = replay(make_app(HEADERS), eml("all-vendors.eml"), "app@shop.example", ["bob@example.org"])
    d = r.txn.directives
    assert d.campaign == "spring_sale-2026" and d.dedup is True
    assert d.custom_id == "order-1234"
    assert d.smarthost is not None and d.smarthost.port == 2525
    assert "s3cr3t-pass" not in repr(d) and "s3cr3t-pass" not in str(d.as_dict())


def test_deletes_are_recorded_highest_occurrence_first(make_app):
    r = replay(make_app(HEADERS), eml("all-vendors.eml"), "a@b.example", ["c@d.example"])
    tags = [e for e in r.outcome.edits if isinstance(e, ChangeHeader) and e.name.lower() == "x-mxm-tag"]
    assert [e.occurrence for e in tags] == [2, 1]
    assert all(e.value is None for e in r.outcome.edits)


def test_keep_and_extra_patterns(make_app):
    chain = [{"use": "headers", "config": {"keep": ["X-Mailjet-*"], "extra": ["X-Keep-*"]}}]
    r = replay(make_app(chain), eml("all-vendors.eml"), "a@b.example", ["c@d.example"])
    names = {n.lower() for n, _ in r.txn.message.headers}
    assert "x-mailjet-campaign" in names and "x-mailjet-prio" in names
    assert "x-keep-me" not in names and "x-mj-customid" not in names
    assert "x-mjfilter-route" not in names  # internal headers always go


def test_keep_cannot_keep_internal_headers(write_config):
    from mjfilter.app import prepare
    from mjfilter.config import ConfigError, load_config

    path = write_config([{"use": "headers", "config": {"keep": ["X-*"]}}])
    with pytest.raises(ConfigError, match="internal headers"):
        prepare(load_config(path))


def test_step_error_tempfails_with_generic_text(make_app):
    app = make_app([{"use": "headers"}, {"use": "test-raise", "config": {"message": "secret detail"}}])
    r = replay(app, eml("plain.eml"), "a@b.example", ["c@d.example"])
    assert r.outcome.verdict == "tempfail"
    assert r.outcome.reply == Reply(451, "4.3.0", "Temporary failure, please try again later")
    assert "secret detail" not in r.outcome.reply.text
    assert r.outcome.all_deliveries(r.txn) == []
    assert r.outcome.trace[-1].action.startswith("error: RuntimeError")


def test_on_error_skip_undoes_the_failed_steps_edits(make_app):
    app = make_app([{"use": "test-raise", "on_error": "skip", "config": {"add_header_first": True}},
                    {"use": "example-stamp"}])
    r = replay(app, eml("plain.eml"), "a@b.example", ["c@d.example"])
    assert r.outcome.verdict == "accept"
    assert r.txn.message.get("X-Before-Raise") is None
    assert r.txn.message.get("X-Stamp") == b"mjfilter"
    assert r.outcome.trace[0].action == "error skipped: RuntimeError"


def test_when_rules_gate_steps(make_app):
    app = make_app([
        {"use": "example-stamp", "name": "only-shop", "when": {"sender_domain": "shop.example"},
         "config": {"header": "X-Shop"}},
        {"use": "example-stamp", "name": "only-auth", "when": {"authenticated": True},
         "config": {"header": "X-Auth"}},
        {"use": "example-stamp", "name": "by-header", "when": {"header": {"Subject": "^pla"}},
         "config": {"header": "X-Subj"}},
        {"use": "example-stamp", "name": "by-client", "when": {"client": ["10.0.0.0/8"]},
         "config": {"header": "X-Net"}},
        {"use": "example-stamp", "name": "by-rcpt", "when": {"recipient": ["*@example.org"], "auth_user": "ali*"},
         "config": {"header": "X-Rcpt"}},
    ])
    r = replay(app, eml("plain.eml"), "app@shop.example", ["bob@example.org"], auth_user="alice")
    got = {n for n, _ in r.txn.message.headers}
    assert {"X-Shop", "X-Auth", "X-Subj", "X-Rcpt"} <= got and "X-Net" not in got
    assert [t.action for t in r.outcome.trace if t.step == "by-client"] == ["skipped: when does not match"]
    r = replay(app, eml("plain.eml"), "x@other.example", ["bob@example.org"], client_ip="10.1.2.3")
    got = {n for n, _ in r.txn.message.headers}
    assert got & {"X-Shop", "X-Auth", "X-Rcpt"} == set() and "X-Net" in got


def test_terminal_verdict_stops_the_chain(make_app):
    app = make_app([{"use": "test-verdict", "config": {"verdict": "reject", "text": "no 100%"}},
                    {"use": "example-stamp"}])
    r = replay(app, eml("plain.eml"), "a@b.example", ["c@d.example"])
    assert r.outcome.verdict == "reject" and r.outcome.reply == Reply(550, "5.7.1", "no 100%")
    assert [t.step for t in r.outcome.trace] == ["test-verdict"]


def test_later_steps_see_earlier_edits(make_app):
    app = make_app([{"use": "test-edits", "config": {"subject": "changed"}},
                    {"use": "example-stamp", "when": {"header": {"Subject": "^changed$"}}}])
    r = replay(app, eml("plain.eml"), "a@b.example", ["c@d.example"])
    assert r.txn.message.get("X-Stamp") == b"mjfilter"


def test_no_recipient_left_means_discard(make_app):
    app = make_app([{"use": "test-edits", "config": {"delete_recipient": "c@d.example"}}])
    r = replay(app, eml("plain.eml"), "a@b.example", ["c@d.example"])
    assert r.outcome.verdict == "discard" and r.outcome.all_deliveries(r.txn) == []


def test_async_step_is_awaited_on_the_engine_loop(make_app):
    r = replay(make_app([{"use": "test-async"}]), eml("plain.eml"), "a@b.example", ["c@d.example"])
    assert r.txn.message.get("X-Async") == b"mjfilter-loop"


def test_malformed_values_become_problems_not_crashes(make_app):
    r = replay(make_app(HEADERS), eml("bad-values.eml"), "a@b.example", ["c@d.example"])
    assert r.outcome.verdict == "accept"
    reasons = {p.header.lower(): p.reason for p in r.txn.directives.problems}
    assert {"x-mj-vars", "x-mailjet-campaign", "x-mxm-flags"} <= set(reasons)
    assert re.search(r"json", reasons["x-mj-vars"], re.I)


def test_actions_refuse_undeclared_and_unsafe_edits():
    txn = make_transaction(eml("plain.eml"), "a@b.example", ["c@d.example"])
    a = Actions(txn)
    a.step, a.allowed = "s", frozenset({"add_header"})
    with pytest.raises(ActionError, match="did not declare"):
        a.replace_body(b"x")
    with pytest.raises(ActionError, match="CR, LF or NUL"):
        a.add_header("X-Evil", "a\r\nBcc: victim@example.org")
    with pytest.raises(ActionError, match="invalid header field name"):
        a.add_header("X Bad", "v")
    with pytest.raises(ActionError):
        Reply(250, "2.0.0", "ok")
    with pytest.raises(ActionError):
        Reply(550, "4.7.1", "mismatch")


def test_large_bodies_spool_to_disk(make_app):
    app = make_app(HEADERS, milter={"body_spool_bytes": 1024})
    body = b"x" * 70 + b"\r\n"
    data = eml("plain.eml") + body * 200
    r = replay(app, data, "a@b.example", ["c@d.example"])
    assert r.txn.message.body.spooled
    assert r.outcome.all_deliveries(r.txn)[0].message.as_bytes().endswith(body * 200)
