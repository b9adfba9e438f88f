"""The router without Postfix: lookup order, per-message checks, the vault, map files, config errors."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from mjfilter.config import ConfigError, RoutingConfig, load_config
from mjfilter.dialects import parse_directives
from mjfilter.frontends.replay import make_transaction
from mjfilter.routing import Router, RoutingError
from mjfilter.routing.postfixmap import MapFileError, parse_map
from mjfilter.routing.vault import Intake, Vault
from mjfilter.store import open_store


def router(tmp_path: Path, **routing: Any) -> Router:
    return Router(RoutingConfig.model_validate(routing), tmp_path, tmp_path / "state")


SMARTHOSTS = {"a": {"host": "192.0.2.10", "port": 587, "username": "ua", "password": "pa", "tls": "required"},
              "d": {"host": "192.0.2.20", "tls": "implicit"}}


def txn(sender: str, headers: str = "", auth: str | None = None) -> Any:
    data = f"From: <{sender}>\r\nSubject: t\r\n{headers}\r\nbody\r\n".encode()
    t = make_transaction(data, sender, ["rcpt@example.org"], auth_user=auth)
    t.directives = parse_directives(t.message.headers)  # as the chain does first
    return t


def test_postfix_lookup_order_across_sources(tmp_path: Path) -> None:
    (tmp_path / "relay").write_text("@b.example [198.51.100.1]:2525\nx@b.example [198.51.100.2]\n")
    r = router(tmp_path, smarthosts=SMARTHOSTS, default="d",
               sender_maps=[{"inline": {"@b.example": "a"}}, {"postfix": {"relay": "relay"}}])
    # user@domain in the second source beats @domain in the first: key order first, then sources
    relay, kind, rule = r.resolve("X+tag@B.example")
    assert (relay.nexthop, kind) == ("[198.51.100.2]:25", "sender-map") and "x@b.example" in rule
    relay, _, rule = r.resolve("y@b.example")
    assert relay.name == "a" and "inline" in rule
    relay, kind, _ = r.resolve("z@c.example")
    assert (relay.name, kind, relay.port) == ("d", "default", 465)  # implicit TLS defaults to 465
    assert r.sender_keys("u+e@d.example") == ["u+e@d.example", "u@d.example", "@d.example"]
    assert r.sender_keys("") == []


def test_map_value_matching_a_smarthost_takes_its_tls_and_credentials(tmp_path: Path) -> None:
    (tmp_path / "sasl").write_text("@c.example uc:pc\n[198.51.100.9]:25 hostuser:hostpw\n")
    r = router(tmp_path, smarthosts=SMARTHOSTS, tls="none",
               sender_maps=[{"inline": {"@a.example": "[192.0.2.10]:587", "@c.example": "[198.51.100.9]",
                                        "@e.example": "[198.51.100.9]"}},
                            {"postfix": {"sasl": "sasl"}}])
    a, _, _ = r.resolve("u@a.example")
    assert (a.name, a.tls, a.credentials) == ("a", "required", "ua:pa")
    c, _, _ = r.resolve("u@c.example")
    assert (c.name, c.tls, c.credentials, c.per_sender) == (None, "none", "uc:pc", True)  # by sender first
    e, _, _ = r.resolve("u@e.example")
    assert (e.credentials, e.per_sender) == ("hostuser:hostpw", False)  # then by next hop
    # Credentials by sender need a sender-dependent transport (no connection reuse); by host not.
    assert r.decide(txn("u@c.example")).transport == "mjfilter-sender-none"
    assert r.decide(txn("u@e.example")).transport == "mjfilter-none"
    assert r.decide(txn("u@a.example")).transport == "mjfilter-required"
    assert [(t[0], t[3]) for t in r.transports()] == [("mjfilter-none", False), ("mjfilter-sender-none", True),
                                                      ("mjfilter-required", False),
                                                      ("mjfilter-sender-required", True),
                                                      ("mjfilter-implicit", False), ("mjfilter-sender-implicit", True)]
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    assert r.lookup("sasl", "u@a.example", store) == "ua:pa"
    assert r.lookup("sasl", "[192.0.2.10]:587", store) == "ua:pa"  # null sender: by next hop
    assert r.lookup("sasl", "u@z.example", store) is None
    assert r.lookup("relayhost", "u@c.example", store) == "[198.51.100.9]:25"
    assert r.lookup("transport", "u@a.example", store) == "mjfilter-required:[192.0.2.10]:587"
    with pytest.raises(RoutingError):
        r.lookup("nosuch", "x", store)


def test_sasl_by_host_answers_only_when_unambiguous(tmp_path: Path) -> None:
    hosts = {"x": {"host": "127.0.0.1", "port": 2525, "username": "ux", "password": "px"},
             "y": {"host": "127.0.0.1", "port": 2526, "username": "uy", "password": "py"},
             "z1": {"host": "192.0.2.5", "username": "uz", "password": "pz"},
             "z2": {"host": "192.0.2.5", "username": "uz2", "password": "pz2"}}
    r = router(tmp_path, smarthosts=hosts, default="x")
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    assert r.lookup("sasl", "127.0.0.1", store) is None  # two accounts on that host: ask by [host]:port
    assert r.lookup("sasl", "[127.0.0.1]:2526", store) == "uy:py"
    # Two smarthosts at one next hop with two accounts: only a sender-dependent lookup can tell.
    assert r.smarthosts["z1"].per_sender and r.lookup("sasl", "[192.0.2.5]:25", store) is None
    assert not r.smarthosts["x"].per_sender


def test_bad_map_value_is_a_routing_error(tmp_path: Path) -> None:
    r = router(tmp_path, sender_maps=[{"inline": {"@a.example": "[192.0.2.1]"}}])
    r.sources[0].entries["@a.example"] = "not a host:port:x"
    with pytest.raises(RoutingError):
        r.resolve("u@a.example")


def test_decide_transport_priority_and_sink(tmp_path: Path) -> None:
    r = router(tmp_path, smarthosts=SMARTHOSTS, sender_maps=[{"inline": {"@a.example": "a"}}],
               priority={0: "bulk", 3: "urgent"})
    d = r.decide(txn("u@a.example", "X-Mailjet-Prio: 3\r\n"))
    assert (d.transport, d.nexthop) == ("urgent-required", "[192.0.2.10]:587")
    d = r.decide(txn("u@z.example", "X-Mailjet-Prio: 0\r\n"))
    assert (d.transport, d.nexthop, d.kind) == ("bulk", "", "priority")  # to the MX, through its transport
    assert not r.decide(txn("u@z.example")).routed  # no rule: Postfix routes it
    names = [t[0] for t in r.transports()]
    # sender maps may name relays that are no smarthost: routing.tls (may) is needed too
    assert names == ["mjfilter-may", "mjfilter-required", "mjfilter-implicit",
                     "bulk", "bulk-may", "bulk-required", "bulk-implicit",
                     "urgent", "urgent-may", "urgent-required", "urgent-implicit"]
    s = router(tmp_path, smarthosts=SMARTHOSTS, sender_maps=[{"inline": {"@a.example": "a"}}],
               sink={"host": "127.0.0.1", "port": 2525, "username": "su", "password": "sp"})
    d = s.decide(txn("u@a.example"))
    assert (d.transport, d.nexthop) == ("mjfilter-none", "[127.0.0.1]:2525")
    assert "smarthost=a" in d.would and "[192.0.2.10]:587" in d.would
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    assert s.lookup("sasl", "u@a.example", store) == "su:sp"  # never the real smarthost's credentials


MQ = {"allow": [{"sender": "*@mq.example", "hosts": ["127.0.0.1", "*.relay.example"]},
                {"auth_user": "alice", "hosts": ["localhost", "10.0.0.0/8"], "allow_private": False}],
      "ports": [25, 587]}


def mq(host: str, port: int = 25, creds: bool = True) -> str:
    h = f"x-mq-smarthost-hostname: {host}\r\nx-mq-smarthost-port: {port}\r\n"
    return h + ("x-mq-smarthost-username: u\r\nx-mq-smarthost-password: p\r\n" if creds else "")


@pytest.mark.parametrize("sender, auth, headers, code, text", [
    ("a@other.example", None, mq("127.0.0.1"), 550, "not allowed for this sender"),
    ("a@mq.example", None, mq("127.0.0.1", 6379), 550, "port 6379 not allowed"),
    ("a@mq.example", None, mq("192.0.2.7"), 550, "192.0.2.7 not allowed"),
    ("x@any.example", "alice", mq("localhost"), 550, "loopback address"),
    ("x@any.example", "alice", mq("10.1.2.3"), 0, ""),  # listed CIDR: explicitly allowed
    ("a@mq.example", None, "x-mq-smarthost-hostname: h..x\r\n", 550, "not a hostname"),
    ("a@mq.example", None, "x-mq-smarthost-hostname: 127.0.0.1\r\nx-mq-smarthost-port: 99999\r\n", 550,
     "not a port"),
    ("a@mq.example", None, mq("nonexistent.invalid"), 550, "not allowed"),
])
def test_per_message_checks(tmp_path: Path, sender: str, auth: str | None, headers: str, code: int,
                            text: str) -> None:
    r = router(tmp_path, per_message=MQ)
    d = r.decide(txn(sender, headers, auth))
    if not text:
        assert d.refusal is None and d.nexthop == "[10.1.2.3]:25" and d.kind == "per-message"
        return
    assert d.refusal is not None and d.refusal.code == code and d.refusal.status == "5.7.1", d.refusal
    assert text in d.refusal.text


def test_per_message_pins_the_checked_address_and_remembers_credentials(tmp_path: Path) -> None:
    r = router(tmp_path, per_message=MQ)
    d = r.decide(txn("a@mq.example", mq("127.0.0.1", 587)))
    assert d.refusal is None and (d.transport, d.nexthop) == ("mjfilter-mq-may", "[127.0.0.1]:587")
    assert d.remember == ("a@mq.example", "[127.0.0.1]:587", "127.0.0.1:587", "u:p")
    assert "password" not in str(d.as_dict()) and "'p'" not in str(d.as_dict())


def test_vault_answers_and_conflicts(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    v = Vault(tmp_path / "state", ttl=60)
    v.remember(store, "a@x.example", "[192.0.2.1]:25", "h1:25", "u1:p1")
    assert v.find(store, "a@x.example").credentials == "u1:p1"
    assert v.find(store, "[192.0.2.1]:25").credentials == "u1:p1"
    v.remember(store, "a@x.example", "[192.0.2.1]:25", "h1:25", "u1:p1")  # the same again: no conflict
    assert not v.find(store, "a@x.example").conflict
    v.remember(store, "a@x.example", "[192.0.2.1]:25", "h1:25", "u1:rotated")  # a new password: replaces
    assert v.find(store, "a@x.example").credentials == "u1:rotated"
    # The same host name at another address (round-robin DNS): still the same for the sender.
    v.remember(store, "a@x.example", "[192.0.2.3]:25", "h1:25", "u1:rotated")
    assert v.find(store, "a@x.example").credentials == "u1:rotated"
    # The same sender to another host with other credentials: the sender record conflicts,
    # each next hop keeps its own.
    v.remember(store, "a@x.example", "[192.0.2.2]:25", "h2:25", "u2:p2")
    assert v.find(store, "a@x.example").conflict
    assert v.find(store, "[192.0.2.2]:25").credentials == "u2:p2"
    # Another sender, same host, another user: that next hop conflicts (Postfix defers).
    v.remember(store, "b@x.example", "[192.0.2.2]:25", "h2:25", "u3:p3")
    assert v.find(store, "[192.0.2.2]:25").conflict
    assert v.find(store, "b@x.example").credentials == "u3:p3"
    assert v.find(store, "nobody@x.example").missing
    # Another host sharing the store (its own key): its own namespace, no conflicts with ours.
    other = Vault(tmp_path / "other-state", ttl=60)
    other.remember(store, "b@x.example", "[192.0.2.2]:25", "h2:25", "u9:p9")
    assert other.find(store, "b@x.example").credentials == "u9:p9"
    assert v.find(store, "b@x.example").credentials == "u3:p3"
    raw = (tmp_path / "s.db").read_bytes()
    assert b"p1" not in raw and b"p2" not in raw  # encrypted at rest
    assert oct((tmp_path / "state" / "routing.key").stat().st_mode & 0o777) == "0o600"


def test_mqsasl_table(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    r = router(tmp_path, per_message=MQ)
    r.vault.remember(store, "a@x.example", "[192.0.2.1]:25", "h:25", "u1:p1")
    r.vault.remember(store, "b@x.example", "[192.0.2.1]:25", "h:25", "u2:p2")
    assert r.lookup("mqsasl", "a@x.example", store) == "u1:p1"
    with pytest.raises(RoutingError):  # ambiguous next hop: TEMP, never someone else's account
        r.lookup("mqsasl", "[192.0.2.1]:25", store)


def test_intake_keeps_credentials_per_connection_and_message(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    v, intake = Vault(tmp_path / "state", ttl=60), Intake()
    assert intake.header(v, store, 1, "Received: from x by y") is None
    assert intake.header(v, store, 1, "x-mq-smarthost-password: s3cret") == "IGNORE"
    assert intake.header(v, store, 2, "Received: from other") is None
    action = intake.header(v, store, 2, "X-MQ-Smarthost-Username: bob")  # another process: own token
    token2 = action.split(": ", 1)[1]
    action = intake.header(v, store, 1, "x-mq-smarthost-username: alice")
    assert action.startswith("REPLACE x-mq-smarthost-username-ref: ")
    token1 = action.split(": ", 1)[1]
    assert token1 != token2
    assert v.redeem(store, token1) == ("alice", "s3cret")
    assert v.redeem(store, token1) is None  # single use
    assert v.redeem(store, token2) == ("bob", None)
    # A client sending a ref header itself (a replay) gets it dropped.
    assert intake.header(v, store, 1, f"x-mq-smarthost-username-ref: {token1}") == "IGNORE"
    # A new message on connection 1 starts clean.
    intake.header(v, store, 1, "Received: from x")
    token3 = intake.header(v, store, 1, "x-mq-smarthost-username: carol").split(": ", 1)[1]
    assert v.redeem(store, token3) == ("carol", None)
    assert intake.header(v, store, 1, "Subject: hello") is None
    assert v.redeem(store, "nonsense!") is None and v.redeem(store, "") is None
    assert b"s3cret" not in (tmp_path / "s.db").read_bytes()


def test_ipv6_literal_in_postfix_syntax(tmp_path: Path) -> None:
    r = router(tmp_path, default="[ipv6:2001:db8::1]:2525")
    assert r.default is not None and r.default.nexthop == "[ipv6:2001:db8::1]:2525"


def test_dry_run_leaves_no_credentials_behind(tmp_path: Path) -> None:
    from mjfilter.app import App
    from mjfilter.frontends.replay import replay

    conf = write_conf(tmp_path, {"per_message": MQ})
    app = App(load_config(conf), store=open_store(f"sqlite:///{tmp_path / 's.db'}"))
    app.start()
    try:
        data = f"From: <a@mq.example>\r\n{mq('127.0.0.1')}\r\nhi\r\n".encode()
        r = replay(app, data, "a@mq.example", ["r@example.org"], commit=False)
        assert r.outcome.route is not None and r.outcome.route.target == "mjfilter-mq-may:[127.0.0.1]:25"
        assert app.router.vault.find(app.store, "a@mq.example").missing
        replay(app, data, "a@mq.example", ["r@example.org"], commit=True)
        assert app.router.vault.find(app.store, "a@mq.example").credentials == "u:p"
    finally:
        app.close()


def test_route_step_redeems_the_token(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    r = router(tmp_path, per_message=MQ)
    token = r.vault.new_token()
    r.vault.deposit(store, token, "u", "u9")
    r.vault.deposit(store, token, "p", "p9")
    headers = f"x-mq-smarthost-hostname: 127.0.0.1\r\nx-mq-smarthost-username-ref: {token}\r\n"
    d = r.decide(txn("a@mq.example", headers), store)
    assert d.refusal is None and d.remember == ("a@mq.example", "[127.0.0.1]:25", "127.0.0.1:25", "u9:p9")
    d = r.decide(txn("a@mq.example", "x-mq-smarthost-hostname: 127.0.0.1\r\n"
                                     "x-mq-smarthost-username-ref: unknowntoken\r\n"), store)
    assert d.refusal is not None and d.refusal.code == 451


def test_parse_map_format() -> None:
    text = "# comment\n\n@a.example   [h]:25\nx@b.example\n  [h2]:26\nDUP@c.example one\ndup@c.example two\n"
    assert parse_map(text, "f") == {"@a.example": "[h]:25", "x@b.example": "[h2]:26", "dup@c.example": "one"}
    with pytest.raises(MapFileError, match="f:2: expected format"):
        parse_map("ok v\nlonely\n", "f")
    with pytest.raises(MapFileError, match="f:1: continuation"):
        parse_map("  starts indented\n", "f")


def test_map_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    p = tmp_path / "relay"
    p.write_text("@a.example [192.0.2.1]\n")
    r = router(tmp_path, sender_maps=[{"postfix": {"relay": "relay"}}])
    r.sources[0].relay_map._interval = 0
    assert r.resolve("u@a.example")[0].host == "192.0.2.1"
    p.write_text("@a.example [192.0.2.99]:2525\n")
    time.sleep(0.01)
    assert r.resolve("u@a.example")[0].nexthop == "[192.0.2.99]:2525"
    p.write_text("broken\n")  # a bad edit keeps the last good contents
    assert r.resolve("u@a.example")[0].nexthop == "[192.0.2.99]:2525"


def write_conf(tmp_path: Path, routing: dict[str, Any], chain: list[dict[str, Any]] | None = None) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "routing": routing,
                                 "chain": chain if chain is not None else [{"use": "route"}]}))
    return p


@pytest.mark.parametrize("routing, message", [
    ({"default": "no such:host:x"}, "not a smarthost name or [host]:port"),
    ({"smarthosts": {"a": {"host": "h", "username": "u"}}}, "username and password go together"),
    ({"sender_maps": [{"inline": {"nodomain": "[h]"}}]}, "a sender map key is user@domain or @domain"),
    ({"sender_maps": [{"sql": {"url": "sqlite:///x", "query": "SELECT 1"}}]}, ":account"),
    ({"priority": {7: "x"}}, "levels are 0..3"),
    ({"per_message": {"allow": [{"hosts": ["h"]}]}}, "needs auth_user:, sender: or both"),
    ({"smarthosts": {"a": {"host": "h", "tls": "sometimes"}}}, "tls"),
    ({"priority": {3: "smtp"}}, "stock Postfix service name"),
    ({"priority": {3: "mjfilter-mq"}}, "would come from both"),
    ({"sink": {"host": "127.0.0.1", "username": "u"}}, "username and password go together"),
])
def test_routing_config_errors_name_the_line(tmp_path: Path, routing: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write_conf(tmp_path, routing))
    assert message in str(e.value) and str(tmp_path / "m.yaml") + ":" in str(e.value)


def test_routing_needs_a_route_step_and_readable_maps(tmp_path: Path) -> None:
    from mjfilter.app import prepare

    with pytest.raises(ConfigError, match="no chain step uses the `route` plugin"):
        prepare(load_config(write_conf(tmp_path, {"default": "[192.0.2.1]"}, chain=[{"use": "headers"}])))
    with pytest.raises(ConfigError, match="No such file"):
        prepare(load_config(write_conf(tmp_path, {"sender_maps": [{"postfix": {"relay": "missing"}}]})))
