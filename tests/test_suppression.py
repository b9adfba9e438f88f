"""The ``suppression`` step (Maxemail master lists) through the replay path, on a real store."""

from __future__ import annotations

import pytest

from mjfilter.actions import Reply
from mjfilter.app import App
from mjfilter.config import ConfigError, load_config
from mjfilter.frontends.replay import replay
from mjfilter.store import SuppressionEntry, normalize_entry
from mjfilter_plugins.suppression import reply_text

SENDER = "app@shop.example"
CHAIN = [{"use": "headers"}, {"use": "suppression"}]


def msg(flags: int | None = None, mid: str = "m1") -> bytes:
    lines = ["From: Shop <app@shop.example>", "To: someone@example.org", "Subject: news",
             f"Message-ID: <{mid}@shop.example>"]
    if flags is not None:
        lines.append(f"X-Mxm-Flags: {flags}")
    return ("\r\n".join(lines) + "\r\n\r\nHello.\r\n").encode()


def suppress(app: App, list_name: str, entry: str, code: int | None = None, reason: str | None = None) -> None:
    app.store.suppress_add([SuppressionEntry(list_name, normalize_entry(entry), code, reason)])


def delivered(r) -> list[str]:
    return [rcpt for d in r.outcome.all_deliveries(r.txn) for rcpt in d.recipients]


def test_unsubscribe_list_is_ignored_without_the_flag(make_app):
    app = make_app(CHAIN)
    suppress(app, "unsubscribe", "bob@example.org")
    for flags in (None, 0, 1, 8):
        r = replay(app, msg(flags), SENDER, ["bob@example.org"])
        assert r.outcome.verdict == "accept" and delivered(r) == ["bob@example.org"] and not r.outcome.events


def test_flag_4_removes_an_unsubscribed_recipient(make_app):
    app = make_app(CHAIN)
    suppress(app, "unsubscribe", "bob@example.org", reason="unsubscribed 2026-01-02")
    r = replay(app, msg(4), SENDER, ["bob@example.org", "eve@example.org"])
    assert r.outcome.verdict == "accept" and delivered(r) == ["eve@example.org"]
    [ev] = [e.as_dict() for e in r.outcome.events]
    assert (ev["event"], ev["email"], ev["error"]) == ("blocked", "bob@example.org", "unsubscribed")
    assert (ev["list"], ev["entry"], ev["reason"]) == ("unsubscribe", "bob@example.org", "unsubscribed 2026-01-02")
    [kept] = app.store.events()
    assert kept["error"] == "unsubscribed" and kept["MessageID"] == "<m1@shop.example>"
    assert r.txn.message.get("X-Mxm-Flags") is None  # still stripped


def test_the_only_recipient_unsubscribed_is_rejected_with_the_entrys_code(make_app):
    app = make_app(CHAIN)
    suppress(app, "unsubscribe", "bob@example.org", code=553, reason="unsubscribed\r\nInjected: yes")
    r = replay(app, msg(4 | 1), SENDER, ["bob@example.org"])
    assert r.outcome.verdict == "reject"
    assert r.outcome.reply == Reply(553, "5.7.1", "recipient suppressed: unsubscribed Injected: yes")
    assert [e.email for e in r.outcome.events] == ["bob@example.org"]
    [kept] = app.store.events()  # a refusal is final: its events are kept
    assert kept["email"] == "bob@example.org" and kept["error"] == "unsubscribed"


def test_every_recipient_suppressed_uses_the_first_recipients_entry(make_app):
    app = make_app(CHAIN)
    suppress(app, "bounce", "a@example.org", code=554, reason="mailbox gone")
    suppress(app, "bounce", "b@example.org", code=550)
    r = replay(app, msg(), SENDER, ["b@example.org", "a@example.org"])
    assert r.outcome.verdict == "reject" and r.outcome.reply == Reply(550, "5.7.1", "recipient suppressed: bounce")
    assert len(r.outcome.events) == 2


def test_default_code_and_a_4xx_entry(make_app):
    app = make_app([{"use": "headers"},
                    {"use": "suppression", "config": {"default_code": 554, "default_status": "5.7.9"}}])
    suppress(app, "bounce", "a@example.org")
    suppress(app, "bounce", "t@example.org", code=450, reason="try later")
    r = replay(app, msg(), SENDER, ["a@example.org"])
    assert r.outcome.reply == Reply(554, "5.7.9", "recipient suppressed: bounce")
    r = replay(app, msg(), SENDER, ["t@example.org"])
    assert r.outcome.verdict == "tempfail" and r.outcome.reply == Reply(450, "4.7.1", "recipient suppressed: try later")


def test_bounce_list_is_checked_by_default_and_skipped_with_flag_8(make_app):
    app = make_app(CHAIN)
    suppress(app, "bounce", "gone@example.net", reason="3 hard bounces")
    r = replay(app, msg(), SENDER, ["gone@example.net", "bob@example.org"])
    assert delivered(r) == ["bob@example.org"]
    [ev] = r.outcome.events
    assert ev.data["error"] == "bounce list" and ev.data["list"] == "bounce"
    r = replay(app, msg(8), SENDER, ["gone@example.net", "bob@example.org"])
    assert delivered(r) == ["gone@example.net", "bob@example.org"] and not r.outcome.events


def test_check_bounce_off(make_app):
    app = make_app([{"use": "headers"}, {"use": "suppression", "config": {"check_bounce": False}}])
    suppress(app, "bounce", "gone@example.net")
    assert delivered(replay(app, msg(), SENDER, ["gone@example.net"])) == ["gone@example.net"]


def test_domain_entries_and_case(make_app):
    app = make_app(CHAIN)
    suppress(app, "bounce", "Dead.Example")
    suppress(app, "bounce", "Bob@Example.ORG")
    r = replay(app, msg(), SENDER, ["x@dead.example", "Y@DEAD.EXAMPLE", "BOB@example.org", "ok@example.org"])
    assert delivered(r) == ["ok@example.org"]
    assert {e.email: e.data["entry"] for e in r.outcome.events} == {
        "x@dead.example": "@dead.example", "Y@DEAD.EXAMPLE": "@dead.example", "BOB@example.org": "bob@example.org"}


def test_both_lists_one_event_per_recipient(make_app):
    app = make_app(CHAIN)
    suppress(app, "unsubscribe", "a@example.org")
    suppress(app, "bounce", "a@example.org")
    suppress(app, "bounce", "b@example.org")
    r = replay(app, msg(4), SENDER, ["a@example.org", "b@example.org", "c@example.org"])
    assert delivered(r) == ["c@example.org"]
    assert [(e.email, e.data["error"]) for e in r.outcome.events] == [
        ("a@example.org", "unsubscribed"), ("b@example.org", "bounce list")]


def test_check_unsubscribe_per_sender_with_a_when_rule(make_app):
    app = make_app([
        {"use": "headers"},
        {"use": "suppression", "name": "newsletters", "when": {"sender": "news@shop.example"},
         "config": {"check_unsubscribe": True}},
    ])
    suppress(app, "unsubscribe", "bob@example.org")
    r = replay(app, msg(), "news@shop.example", ["bob@example.org", "eve@example.org"])
    assert delivered(r) == ["eve@example.org"] and r.outcome.events[0].data["error"] == "unsubscribed"
    r = replay(app, msg(), "orders@shop.example", ["bob@example.org", "eve@example.org"])
    assert delivered(r) == ["bob@example.org", "eve@example.org"]
    assert [t.action for t in r.outcome.trace if t.step == "newsletters"] == ["skipped: when does not match"]


def test_store_down_tempfails(make_app):
    app = make_app([{"use": "headers"}, {"use": "suppression", "on_error": "skip"}],
                   store={"url": "redis://127.0.0.1:1/0", "timeout": 0.5})
    r = replay(app, msg(), SENDER, ["bob@example.org"])
    assert r.outcome.verdict == "tempfail" and (r.outcome.reply.code, r.outcome.reply.status) == (451, "4.3.0")


def test_nothing_to_check_needs_no_store(make_app):
    app = make_app([{"use": "headers"}, {"use": "suppression", "config": {"check_bounce": False}}],
                   store={"url": "redis://127.0.0.1:1/0", "timeout": 0.5})
    assert replay(app, msg(), SENDER, ["bob@example.org"]).outcome.verdict == "accept"


def test_reply_text_is_short_and_safe():
    long = SuppressionEntry("bounce", "a@example.org", 550, "x" * 500 + "\r\n\0é")
    text = reply_text(long)
    assert text.startswith("recipient suppressed: xxx") and text.endswith("...") and len(text) < 130
    assert reply_text(SuppressionEntry("bounce", "a@example.org", None, " caf\u00e9\tclosed ")) == \
        "recipient suppressed: caf? closed"


@pytest.mark.parametrize("config, where", [
    ({"default_code": 250}, "default_code"),
    ({"default_code": 450}, "does not match"),
    ({"default_status": "5.7"}, "default_status"),
    ({"check_unsubscribed": True}, "check_unsubscribed"),
])
def test_config_is_validated(write_config, config, where):
    from mjfilter.app import prepare

    with pytest.raises(ConfigError, match=where):
        prepare(load_config(write_config([{"use": "suppression", "config": config}])))
