"""The ``dedup`` step (X-Mailjet-DeduplicateCampaign) through the replay path, on a real store."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from mjfilter.actions import Reply
from mjfilter.config import ConfigError, load_config
from mjfilter.frontends.replay import replay
from mjfilter_plugins.dedup import Config, dedup_key, key_scope, normalize_recipient

SENDER = "app@shop.example"
CHAIN = [{"use": "headers"}, {"use": "dedup"}]


def msg(mid: str = "m1", campaign: str | None = "spring", dedup: bool = True, body: str = "Hello.") -> bytes:
    lines = ["From: Shop <app@shop.example>", "To: someone@example.org", "Subject: offer",
             f"Message-ID: <{mid}@shop.example>"]
    if campaign is not None:
        lines.append(f"X-Mailjet-Campaign: {campaign}")
    if dedup:
        lines.append("X-Mailjet-DeduplicateCampaign: yes")
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


def delivered(r) -> list[str]:
    return [rcpt for d in r.outcome.all_deliveries(r.txn) for rcpt in d.recipients]


def test_second_message_of_a_campaign_to_the_same_recipient_is_blocked(make_app):
    app = make_app(CHAIN)
    first = replay(app, msg("m1"), SENDER, ["bob@example.org"])
    assert first.outcome.verdict == "accept" and delivered(first) == ["bob@example.org"]
    second = replay(app, msg("m2"), SENDER, ["bob@example.org"])
    assert second.outcome.verdict == "discard" and delivered(second) == []
    [ev] = [e.as_dict() for e in second.outcome.events]
    assert ev["event"] == "blocked" and ev["email"] == "bob@example.org"
    assert ev["error"] == "duplicate in campaign" and ev["campaign"] == "spring"
    [kept] = [e for e in app.store.events() if e["event"] == "blocked"]
    assert kept["email"] == "bob@example.org" and kept["error"] == "duplicate in campaign"
    assert kept["customcampaign"] == "spring" and kept["MessageID"] == "<m2@shop.example>"
    # the control headers are gone from what is delivered
    assert first.txn.message.get("X-Mailjet-DeduplicateCampaign") is None


def test_without_the_dedup_header_both_are_delivered(make_app):
    app = make_app(CHAIN)
    for mid in ("m1", "m2"):
        r = replay(app, msg(mid, dedup=False), SENDER, ["bob@example.org"])
        assert r.outcome.verdict == "accept" and delivered(r) == ["bob@example.org"] and not r.outcome.events


def test_dedup_without_campaign_does_nothing(make_app):
    app = make_app(CHAIN)
    for mid in ("m1", "m2"):
        r = replay(app, msg(mid, campaign=None), SENDER, ["bob@example.org"])
        assert r.outcome.verdict == "accept"
    assert app.store.campaigns() == []


def test_another_campaign_is_delivered(make_app):
    app = make_app(CHAIN)
    assert replay(app, msg("m1", "spring"), SENDER, ["bob@example.org"]).outcome.verdict == "accept"
    r = replay(app, msg("m2", "autumn"), SENDER, ["bob@example.org"])
    assert r.outcome.verdict == "accept" and delivered(r) == ["bob@example.org"]


def test_only_the_served_recipient_is_removed(make_app):
    app = make_app(CHAIN)
    replay(app, msg("m1"), SENDER, ["b@example.org"])
    r = replay(app, msg("m2"), SENDER, ["a@example.org", "b@example.org", "c@example.org"])
    assert r.outcome.verdict == "accept"
    [d] = r.outcome.all_deliveries(r.txn)
    assert d.recipients == ["a@example.org", "c@example.org"]
    assert [(e.event, e.email) for e in r.outcome.events] == [("blocked", "b@example.org")]
    assert "blocked 1 duplicate recipient" in next(t.action for t in r.outcome.trace if t.step == "dedup")


def test_a_retry_after_a_later_tempfail_is_delivered(make_app):
    failing = make_app([*CHAIN, {"use": "test-verdict", "config": {"verdict": "tempfail"}}], name="fail.yaml")
    r = replay(failing, msg("m1"), SENDER, ["bob@example.org"])
    assert r.outcome.verdict == "tempfail"
    key = dedup_key(key_scope(None, Config()), "spring", "bob@example.org")
    assert failing.store.holder(key) is None  # released: the attempt did not count
    ok = make_app(CHAIN, name="ok.yaml")  # same state_dir, same store
    r = replay(ok, msg("m1"), SENDER, ["bob@example.org"])
    assert r.outcome.verdict == "accept" and delivered(r) == ["bob@example.org"] and not r.outcome.events


def test_a_later_reject_releases_so_another_message_is_delivered(make_app):
    rejecting = make_app([*CHAIN, {"use": "test-verdict", "config": {"verdict": "reject"}}], name="rej.yaml")
    assert replay(rejecting, msg("m1"), SENDER, ["bob@example.org"]).outcome.verdict == "reject"
    ok = make_app(CHAIN, name="ok.yaml")
    r = replay(ok, msg("m2", body="A corrected message."), SENDER, ["bob@example.org"])
    assert r.outcome.verdict == "accept" and delivered(r) == ["bob@example.org"]
    assert [(c.messages, c.delivered) for c in ok.store.campaigns()] == [(1, 1)]  # the rejected one is not counted


def test_the_same_message_again_after_accept_is_not_a_duplicate(make_app):
    app = make_app(CHAIN)
    assert delivered(replay(app, msg("m1"), SENDER, ["bob@example.org"])) == ["bob@example.org"]
    again = replay(app, msg("m1"), SENDER, ["bob@example.org"])  # same Message-ID and body: same fingerprint
    assert again.outcome.verdict == "accept" and delivered(again) == ["bob@example.org"]
    other_body = replay(app, msg("m1", body="Different."), SENDER, ["bob@example.org"])
    assert other_body.outcome.verdict == "discard"  # same Message-ID, other content: another message


def test_campaigns_are_per_tenant(make_app):
    app = make_app(CHAIN)
    assert replay(app, msg("a1"), SENDER, ["bob@example.org"], auth_user="alice").outcome.verdict == "accept"
    assert replay(app, msg("b1"), SENDER, ["bob@example.org"], auth_user="bob").outcome.verdict == "accept"
    assert replay(app, msg("n1"), SENDER, ["bob@example.org"]).outcome.verdict == "accept"  # unauthenticated
    assert replay(app, msg("a2"), SENDER, ["bob@example.org"], auth_user="alice").outcome.verdict == "discard"
    assert replay(app, msg("n2"), SENDER, ["bob@example.org"]).outcome.verdict == "discard"
    tenants = {(c.tenant, c.campaign): (c.messages, c.delivered, c.blocked) for c in app.store.campaigns()}
    assert tenants == {("alice", "spring"): (2, 1, 1), ("bob", "spring"): (1, 1, 0), ("-", "spring"): (2, 1, 1)}


def test_per_tenant_off_shares_campaigns(make_app):
    app = make_app([{"use": "headers"}, {"use": "dedup", "config": {"per_tenant": False}}])
    assert replay(app, msg("a1"), SENDER, ["bob@example.org"], auth_user="alice").outcome.verdict == "accept"
    assert replay(app, msg("b1"), SENDER, ["bob@example.org"], auth_user="bob").outcome.verdict == "discard"


def test_a_tenant_named_dash_is_not_the_unauthenticated_tenant(make_app):
    app = make_app(CHAIN)
    assert replay(app, msg("n1"), SENDER, ["bob@example.org"]).outcome.verdict == "accept"
    assert replay(app, msg("d1"), SENDER, ["bob@example.org"], auth_user="-").outcome.verdict == "accept"


@pytest.mark.parametrize("config, first, second, blocked", [
    ({}, "bob@Example.ORG", "bob@example.org", True),  # domains always compare lowercase
    ({}, "Bob@example.org", "bob@example.org", False),  # local parts are exact by default (Mailjet)
    ({"normalize_case": True}, "Bob@example.org", "bob@example.org", True),
    ({}, "bob+news@example.org", "bob+promo@example.org", False),
    ({"normalize_plus": True}, "bob+news@example.org", "bob@example.org", True),
    ({"normalize_plus": True}, "bob+news@example.org", "Bob+x@example.org", False),
    ({"normalize_plus": True, "normalize_case": True}, "bob+news@example.org", "Bob+x@EXAMPLE.org", True),
])
def test_normalisation_options(make_app, config, first, second, blocked):
    app = make_app([{"use": "headers"}, {"use": "dedup", "config": config}])
    assert replay(app, msg("m1"), SENDER, [first]).outcome.verdict == "accept"
    r = replay(app, msg("m2"), SENDER, [second])
    assert r.outcome.verdict == ("discard" if blocked else "accept")


def test_normalised_repeats_within_one_message(make_app):
    app = make_app([{"use": "headers"}, {"use": "dedup", "config": {"normalize_plus": True}}])
    r = replay(app, msg("m1"), SENDER, ["bob+a@example.org", "bob+b@example.org", "eve@example.org"])
    assert delivered(r) == ["bob+a@example.org", "eve@example.org"]
    assert [e.email for e in r.outcome.events] == ["bob+b@example.org"]
    again = replay(app, msg("m1"), SENDER, ["bob+a@example.org", "bob+b@example.org", "eve@example.org"])
    assert delivered(again) == ["bob+a@example.org", "eve@example.org"]  # a retry gets the same answer


def test_normalize_recipient():
    plain, both = Config(), Config(normalize_case=True, normalize_plus=True)
    assert normalize_recipient("Bob+X@Example.ORG", plain) == "Bob+X@example.org"
    assert normalize_recipient("Bob+X@Example.ORG", both) == "bob@example.org"
    assert normalize_recipient("+only@example.org", both) == "+only@example.org"
    assert normalize_recipient("postmaster", both) == "postmaster"


def test_keys_are_hashed_and_bounded():
    key = dedup_key(["user", "alice"], "a campaign" * 30, "x" * 300 + "@example.org\r\n")
    assert key.startswith("dedup:") and len(key) == len("dedup:") + 64 and key.isascii()
    assert dedup_key(["user", "a"], "b", "c") != dedup_key(["user", "a"], "b", "C")


def test_window_expiry(make_app):
    app = make_app([{"use": "headers"}, {"use": "dedup", "config": {"window": 1}}])
    assert replay(app, msg("m1"), SENDER, ["bob@example.org"]).outcome.verdict == "accept"
    assert replay(app, msg("m2"), SENDER, ["bob@example.org"]).outcome.verdict == "discard"
    time.sleep(1.2)
    assert replay(app, msg("m3"), SENDER, ["bob@example.org"]).outcome.verdict == "accept"


def test_racing_messages_deliver_exactly_once(make_app):
    app = make_app(CHAIN)
    n = 50
    verdicts: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def send(i: int) -> None:
        barrier.wait()
        r = replay(app, msg(f"race-{i}"), SENDER, ["bob@example.org"])
        with lock:
            verdicts.append(r.outcome.verdict)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(verdicts) == ["accept"] + ["discard"] * (n - 1)
    [stats] = app.store.campaigns()
    assert (stats.messages, stats.delivered, stats.blocked) == (n, 1, n - 1)


def test_campaign_counters(make_app):
    app = make_app(CHAIN)
    replay(app, msg("m1"), SENDER, ["a@example.org", "b@example.org"])
    replay(app, msg("m2"), SENDER, ["b@example.org", "c@example.org"])
    replay(app, msg("m3"), SENDER, ["a@example.org"])
    replay(app, msg("x1", campaign="no-dedup", dedup=False), SENDER, ["a@example.org", "b@example.org"])
    stats = {c.campaign: c for c in app.store.campaigns()}
    s = stats["spring"]
    assert (s.tenant, s.messages, s.delivered, s.blocked) == ("-", 3, 3, 2)
    assert s.first_seen is not None and s.last_seen is not None and s.first_seen <= s.last_seen
    nd = stats["no-dedup"]
    assert (nd.messages, nd.delivered, nd.blocked) == (1, 2, 0)


def test_tempfailed_messages_are_not_counted(make_app):
    app = make_app([*CHAIN, {"use": "test-verdict", "config": {"verdict": "tempfail"}}])
    replay(app, msg("m1"), SENDER, ["a@example.org"])
    assert app.store.campaigns() == []


def test_store_down_tempfails_even_with_on_error_skip(make_app):
    app = make_app([{"use": "headers"}, {"use": "dedup", "on_error": "skip"}],
                   store={"url": "redis://127.0.0.1:1/0", "timeout": 0.5})
    t0 = time.monotonic()
    r = replay(app, msg("m1"), SENDER, ["bob@example.org"])
    assert r.outcome.verdict == "tempfail" and r.outcome.reply == Reply(451, "4.3.0", r.outcome.reply.text)
    assert r.outcome.all_deliveries(r.txn) == []
    assert time.monotonic() - t0 < 10


def test_locked_sqlite_store_tempfails_even_with_on_error_skip(make_app, tmp_path):
    db = tmp_path / "locked.db"
    app = make_app([{"use": "headers"}, {"use": "dedup", "on_error": "skip"}],
                   store={"url": f"sqlite:///{db}", "timeout": 0.3})
    app.store.ping()  # create the file, then lock it from outside
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        r = replay(app, msg("m1"), SENDER, ["bob@example.org"])
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert r.outcome.verdict == "tempfail" and (r.outcome.reply.code, r.outcome.reply.status) == (451, "4.3.0")
    assert r.outcome.trace[-1].action == "error: store unavailable: tempfail"
    r = replay(app, msg("m1"), SENDER, ["bob@example.org"])  # the client's retry, store back
    assert r.outcome.verdict == "accept"


def test_config_is_validated(write_config):
    from mjfilter.app import prepare

    for bad, where in (({"window": 0}, "window"), ({"windw": 5}, "windw")):
        with pytest.raises(ConfigError, match=where):
            prepare(load_config(write_config([{"use": "dedup", "config": bad}])))


def test_two_dedup_steps_keep_their_own_state(make_app):
    app = make_app([{"use": "headers"},
                    {"use": "dedup", "name": "dedup-alice", "when": {"auth_user": "alice"}},
                    {"use": "dedup", "name": "dedup-any", "config": {"per_tenant": False}}])
    r = replay(app, msg("m1"), SENDER, ["bob@example.org"], auth_user="alice")
    assert set(r.txn.state) == {"dedup-alice", "dedup-any"}
    assert r.outcome.verdict == "accept"


def test_failed_retry_of_a_delivered_message_keeps_its_reservation(make_app):
    """A HELD key (claimed by an earlier, delivered attempt) survives a later failed attempt."""
    from mjfilter.frontends.replay import replay as run

    data = (b"From: a@shop.example\r\nMessage-ID: <held-1@shop.example>\r\nX-Mailjet-Campaign: c1\r\n"
            b"X-Mailjet-DeduplicateCampaign: yes\r\n\r\nHi.\r\n")
    app = make_app([{"use": "headers"}, {"use": "dedup"}])
    assert run(app, data, "a@shop.example", ["bob@example.org"]).outcome.verdict == "accept"
    failing = make_app([{"use": "headers"}, {"use": "dedup"}, {"use": "test-verdict", "config": {"verdict": "tempfail"}}])
    assert run(failing, data, "a@shop.example", ["bob@example.org"]).outcome.verdict == "tempfail"
    # and a dry run of the delivered message does not free the recipient either
    run(app, data, "a@shop.example", ["bob@example.org"], commit=False)
    other = data.replace(b"<held-1@", b"<held-2@")
    assert run(app, other, "a@shop.example", ["bob@example.org"]).outcome.verdict == "discard"
