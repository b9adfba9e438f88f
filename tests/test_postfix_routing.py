"""Issue 3 through a real Postfix: smarthost selection and the hand-back to Postfix.

client -> Postfix (smtpd_milters = mjfilter) -> milter_header_checks FILTER
-> mjfilter's transports (SASL from mjfilter's socketmap) -> AUTH-requiring sinks.

Postfix is configured with exactly what `mjfilter postfix-config` prints.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from mjd import Daemon, world_main_cf
from pg_rig import PostgresServer
from rig import PostfixRig, Sink, free_port, smtp_send

pytestmark = [pytest.mark.postfix]

CHAIN = [{"use": "headers"}, {"use": "route"}]
MQ_PASSWORD = "Mq-S3cret-Pa55word"


def message(extra: list[str] | None = None, sender: str = "app@shop.example") -> bytes:
    head = [f"From: <{sender}>", "To: <bob@example.org>", "Subject: routing test",
            f"Message-ID: <{uuid.uuid4().hex}@shop.example>", *(extra or [])]
    return ("\r\n".join(head) + "\r\n\r\nHello.\r\n").encode()


class World:
    """Sinks A, B (AUTH, different users), D (the default smarthost, AUTH), C (per-message,
    AUTH), MX (Postfix's own relayhost: mail nothing routes), S (sink mode), a daemon and a
    Postfix configured from `mjfilter postfix-config`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.a = Sink(users={"usera": "pwa"}).start()
        self.b = Sink(users={"userb": "pwb"}).start()
        self.d = Sink(users={"userd": "pwd"}).start()
        self.c = Sink(users={"userc": MQ_PASSWORD}).start()
        self.mx = Sink().start()
        self.req = Sink(users={"userr": "pwr"}, starttls=True).start()  # tls: required (STARTTLS)
        self.imp = Sink(users={"useri": "pwi"}, implicit_tls=True).start()  # tls: implicit (as on 465)
        self.s = Sink().start()
        self.socketmap_port = free_port()
        self.daemon = Daemon(base / "mj", CHAIN, routing=self.routing())
        self.pf: PostfixRig | None = None
        try:
            self.daemon.start()
            main = world_main_cf(self.daemon)
            master = self.daemon.postfix_config("master")
            self.pf = PostfixRig(base / "pf", relay_port=self.mx.port, main_cf=main, master_cf=master).start()
        except BaseException:
            self.close()
            raise

    def smarthost(self, sink: Sink, user: str, password: str) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": sink.port, "username": user, "password": password, "tls": "none"}

    def routing(self, **over: Any) -> dict[str, Any]:
        # An (empty) sasl_passwd source, so that postfix-config prints the sender-dependent
        # transports too: later tests switch to rules that need them, by reload only.
        empty = self.base / "empty_sasl_passwd"
        if not empty.exists():
            empty.write_text("# no entries\n")
        r: dict[str, Any] = {
            "socketmap": f"inet:127.0.0.1:{self.socketmap_port}",
            "tls": "none",
            "smarthosts": {"a": self.smarthost(self.a, "usera", "pwa"), "b": self.smarthost(self.b, "userb", "pwb"),
                           "d": self.smarthost(self.d, "userd", "pwd"),
                           "req": {**self.smarthost(self.req, "userr", "pwr"), "tls": "required"},
                           "imp": {**self.smarthost(self.imp, "useri", "pwi"), "tls": "implicit"}},
            "default": "d",
            "sender_maps": [{"inline": {"@a.example": "a", "x@b.example": "b", "@req.example": "req",
                                        "@imp.example": "imp"}},
                            {"postfix": {"sasl": str(empty)}}],
            "per_message": {"allow": [{"sender": "*@mq.example", "hosts": ["127.0.0.1"]},
                                      {"sender": "*@named.example", "hosts": ["localhost"]}],
                            "ports": [25, 587, self.c.port], "tls": "none"},
            "priority": {0: "mjfilter-low", 3: "mjfilter-urgent"},
        }
        r.update(over)
        return r

    def reload(self, **routing: Any) -> None:
        self.daemon.write(CHAIN, routing=self.routing(**routing))
        r = self.daemon.mjfilter("reload")
        assert r.returncode == 0, r.stdout + r.stderr

    def send(self, sender: str, extra: list[str] | None = None) -> tuple[int, str]:
        assert self.pf is not None
        reply = smtp_send(self.pf.smtp_port, sender, ["bob@example.org"], message(extra, sender))
        return reply.code, reply.message

    def close(self) -> None:
        if self.pf is not None:
            self.pf.stop()
        self.daemon.stop()
        for s in (self.a, self.b, self.d, self.c, self.mx, self.s, self.req, self.imp):
            s.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    w = World(tmp_path_factory.mktemp("routing"))
    yield w
    w.close()


def only(sink: Sink, timeout: float = 30.0) -> Any:
    got = sink.wait_for(1, timeout=timeout)
    assert len(got) == 1, [m.mail_from for m in got]
    sink.clear()
    return got[0]


def assert_routes(world: World, cases: list[tuple[str, Sink, str]]) -> None:
    for sender, sink, user in cases:
        code, text = world.send(sender)
        assert code == 250, text
        got = only(sink)
        assert got.mail_from == sender and got.auth_user == user, (sender, got.auth_user)
        assert not got.headers("X-Mjfilter-Route"), "the route header must not leave Postfix"
    assert world.pf is not None
    world.pf.wait_queue_empty()
    for s in (world.a, world.b, world.d, world.mx):
        assert not s.messages, f"stray message at sink {s.port}"


def test_sender_maps_from_yaml(world: World) -> None:
    world.reload()
    assert_routes(world, [
        ("u@a.example", world.a, "usera"),
        ("x@b.example", world.b, "userb"),
        ("x+news@b.example", world.b, "userb"),  # user+ext@domain falls back to user@domain
        ("y@b.example", world.d, "userd"),  # no rule: the default smarthost
    ])


def test_tls_policies_required_and_implicit(world: World) -> None:
    world.reload()
    assert world.pf is not None
    for sender, sink, user, transport in (("u@req.example", world.req, "userr", "mjfilter-required"),
                                          ("u@imp.example", world.imp, "useri", "mjfilter-implicit")):
        mark = world.pf.log_mark()
        code, text = world.send(sender)
        assert code == 250, text
        got = only(sink)
        assert got.auth_user == user
        # STARTTLS was used before AUTH; the implicit-TLS sink speaks nothing but TLS.
        assert got.tls or sink.implicit_tls
        world.pf.wait_log(rf"postfix/{transport}/smtp\[\d+\]: \w+: to=<bob@example.org>.*status=sent", since=mark)


def test_sender_maps_from_postfix_map_files(world: World) -> None:
    # The Mailjet seed's files: sender_relay and sasl_passwd, credentials keyed by sender.
    files = world.base / "maps"
    files.mkdir(exist_ok=True)
    (files / "sender_relay").write_text(f"# from the Mailjet guide\n@a.example [127.0.0.1]:{world.a.port}\n"
                                        f"x@b.example [127.0.0.1]:{world.b.port}\n")
    (files / "sasl_passwd").write_text("@a.example usera:pwa\nx@b.example userb:pwb\n")
    # No smarthost definitions for A and B this time: their credentials come from sasl_passwd.
    world.reload(smarthosts={"d": world.smarthost(world.d, "userd", "pwd")},
                 sender_maps=[{"postfix": {"relay": str(files / "sender_relay"), "sasl": str(files / "sasl_passwd")}}])
    assert_routes(world, [("u@a.example", world.a, "usera"), ("x@b.example", world.b, "userb"),
                          ("y@b.example", world.d, "userd")])


def sql_rows(world: World) -> list[tuple[str, str]]:
    return [("@a.example", f"[127.0.0.1]:{world.a.port}"), ("x@b.example", f"[127.0.0.1]:{world.b.port}")]


def test_sender_maps_from_sqlite(world: World) -> None:
    # iRedMail's table; the credentials are those of the smarthost with that next hop.
    db = world.base / "iredmail.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS sender_relayhost (account TEXT PRIMARY KEY, relayhost TEXT)")
        conn.executemany("INSERT OR REPLACE INTO sender_relayhost VALUES (?, ?)", sql_rows(world))
    world.reload(sender_maps=[{"sql": {"url": f"sqlite:///{db}"}}])
    assert_routes(world, [("u@a.example", world.a, "usera"), ("x@b.example", world.b, "userb"),
                          ("y@b.example", world.d, "userd")])


def test_sender_maps_from_postgresql(world: World, tmp_path: Path) -> None:
    with PostgresServer(tmp_path / "pg") as pg:
        pg.execute("CREATE TABLE sender_relayhost (account varchar(255) PRIMARY KEY, relayhost varchar(255))")
        for account, relay in sql_rows(world):
            pg.execute(f"INSERT INTO sender_relayhost VALUES ('{account}', '{relay}')")
        world.reload(sender_maps=[{"sql": {"url": pg.url}}])
        assert_routes(world, [("u@a.example", world.a, "usera"), ("x@b.example", world.b, "userb"),
                              ("y@b.example", world.d, "userd")])
        world.reload()  # before the database goes away


def test_sender_maps_from_ldap(world: World, tmp_path: Path) -> None:
    # iRedMail's senderRelayHost on the domain entry (@a.example) and on a user entry (x@b.example).
    from ldap_rig import SlapdServer
    from test_routing_ldap import DOMAINS, domain_ldif, user_ldif

    with SlapdServer(tmp_path / "ldap") as ldap:
        ldap.add(f"dn: {DOMAINS}\nobjectClass: organization\no: domains\n\n"
                 + domain_ldif("a.example", f"[127.0.0.1]:{world.a.port}") + domain_ldif("b.example")
                 + user_ldif("x@b.example", f"[127.0.0.1]:{world.b.port}"))
        world.reload(sender_maps=[{"ldap": {"url": ldap.url, "base": DOMAINS, "bind_dn": ldap.bind_dn,
                                            "bind_password": ldap.bind_password}}])
        assert_routes(world, [("u@a.example", world.a, "usera"), ("x@b.example", world.b, "userb"),
                              ("y@b.example", world.d, "userd")])
        world.reload()  # before the directory goes away


def mq_headers(host: str = "127.0.0.1", port: int | None = None, user: str | None = "userc",
               password: str | None = MQ_PASSWORD) -> list[str]:
    h = [f"x-mq-smarthost-hostname: {host}"]
    if port is not None:
        h.append(f"x-mq-smarthost-port: {port}")
    if user:
        h.append(f"x-mq-smarthost-username: {user}")
    if password:
        h.append(f"x-mq-smarthost-password: {password}")
    return h


def test_per_message_smarthost_with_credentials_leaves_no_password_behind(world: World) -> None:
    world.reload()
    assert world.pf is not None
    # First with C down: the message waits in Postfix's queue, where we look for the password.
    world.c.stop()
    mark = world.pf.log_mark()
    code, text = world.send("app@mq.example", mq_headers(port=world.c.port))
    assert code == 250, text
    world.pf.wait_log(r"status=deferred", since=mark)
    queued = [p for p in world.pf.queue_dir.rglob("*") if p.is_file()]
    assert queued, "the message should be queued"
    for p in queued:
        assert MQ_PASSWORD.encode() not in p.read_bytes(), f"password in queue file {p}"
    world.c.start()
    world.pf.flush()
    got = only(world.c)
    assert got.auth_user == "userc" and got.mail_from == "app@mq.example"
    assert MQ_PASSWORD.encode() not in got.data
    assert not [k for k in got.headers("x-mq-smarthost-username")], "control headers must be stripped"
    world.pf.wait_queue_empty()
    # Nowhere else either: Postfix's log, mjfilter's log, the store (events, vault) on disk.
    assert MQ_PASSWORD not in world.pf.maillog()
    assert MQ_PASSWORD not in world.daemon.log()
    state = world.base / "mj" / "state"
    for p in state.rglob("*"):
        if p.is_file():
            assert MQ_PASSWORD.encode() not in p.read_bytes(), f"password in {p}"
    for s in (world.a, world.b, world.d, world.mx):
        assert not s.messages


def test_a_replayed_credential_token_is_useless(world: World) -> None:
    """The token that stands for a message's credentials is single use, and a client cannot
    send one itself: header_checks drop a client's x-mq-smarthost-username-ref."""
    world.reload()
    assert world.pf is not None
    mark = world.pf.log_mark()
    assert world.send("app@mq.example", mq_headers(port=world.c.port))[0] == 250
    assert only(world.c).auth_user == "userc"
    token = world.pf.wait_log(r"x-mq-smarthost-username-ref: (\S+)", since=mark).group(1)  # Postfix logs it
    # Mallory (also allowed to name 127.0.0.1) replays it: the header is dropped before the
    # milter sees it, so the message has no credentials and the AUTH-requiring sink refuses it.
    mark = world.pf.log_mark()
    code, _ = world.send("mallory@mq.example", ["x-mq-smarthost-hostname: 127.0.0.1",
                                                f"x-mq-smarthost-port: {world.c.port}",
                                                f"x-mq-smarthost-username-ref: {token}"])
    assert code == 250
    world.pf.wait_log(r"to=<bob@example.org>.*status=(bounced|deferred)", since=mark)
    assert not world.c.messages
    # Clean up for the next tests: the refused message (or its bounce) must not linger.
    subprocess.run(["postsuper", "-c", str(world.pf.conf_dir), "-d", "ALL"], capture_output=True, timeout=30)
    world.pf.wait_queue_empty()
    for s in (world.a, world.b, world.c, world.d, world.mx):
        s.clear()


@pytest.mark.parametrize("sender, headers, why", [
    ("app@shop.example", mq_headers(port=25), "not allowed for this sender"),  # no allow-list entry
    ("app@mq.example", mq_headers(port=6379), "port 6379 not allowed"),
    ("app@mq.example", mq_headers(host="10.1.2.3", port=25), "10.1.2.3 not allowed"),
    ("app@named.example", mq_headers(host="localhost", port=25), "loopback address"),
])
def test_per_message_smarthost_refused(world: World, sender: str, headers: list[str], why: str) -> None:
    code, text = world.send(sender, headers)
    assert code == 550 and "5.7.1" in text and why in text, (code, text)


def test_smarthost_down_defers_then_delivers_once(world: World) -> None:
    world.reload()
    assert world.pf is not None
    world.a.stop()
    mark = world.pf.log_mark()
    code, text = world.send("late@a.example")
    assert code == 250, text
    world.pf.wait_log(r"status=deferred", since=mark)
    assert not world.pf.queue_empty()
    world.a.start()
    world.pf.flush()
    got = only(world.a)
    assert got.mail_from == "late@a.example" and got.auth_user == "usera"
    world.pf.wait_queue_empty()
    assert not world.a.messages and not world.d.messages


def test_priorities_leave_through_their_transports(world: World) -> None:
    world.reload()
    assert world.pf is not None
    for prio, transport in (("3", "mjfilter-urgent-none"), ("0", "mjfilter-low-none")):
        mark = world.pf.log_mark()
        code, text = world.send("y@b.example", [f"X-Mailjet-Prio: {prio}"])
        assert code == 250, text
        got = only(world.d)
        assert got.auth_user == "userd"
        line = world.pf.wait_log(rf"postfix/{re.escape(transport)}/smtp\[\d+\]: \w+: to=<bob@example.org>.*status=sent",
                                 since=mark)
        assert f"[127.0.0.1]:{world.d.port}" in line.group(0)
    # Prio 2 (Mailjet's default for SMTP) has no transport of its own here: the plain route.
    mark = world.pf.log_mark()
    world.send("y@b.example", ["X-Mailjet-Prio: 2"])
    only(world.d)
    world.pf.wait_log(r"postfix/mjfilter-none/smtp\[\d+\]: \w+: to=<bob@example.org>.*status=sent", since=mark)


def test_sink_mode_sends_everything_to_the_sink(world: World) -> None:
    world.reload(sink={"host": "127.0.0.1", "port": world.s.port, "tls": "none"})
    try:
        cases = [("u@a.example", [], "smarthost=a"), ("y@b.example", [], "smarthost=d"),
                 ("app@mq.example", mq_headers(port=world.c.port), "smarthost=127.0.0.1")]
        for sender, extra, would in cases:
            mark = world.daemon.log()
            code, text = world.send(sender, extra)
            assert code == 250, text
            got = only(world.s)
            assert got.auth_user is None  # the sink gets no smarthost's credentials
            (header,) = got.headers("X-Mjfilter-Would-Route")
            assert would in header, header
            logged = [ln for ln in world.daemon.log()[len(mark):].splitlines() if "sink mode: would route" in ln]
            assert logged and would in logged[-1], logged
        assert world.pf is not None
        world.pf.wait_queue_empty()
        for s in (world.a, world.b, world.c, world.d, world.mx):
            assert not s.messages
    finally:
        world.reload()


# -- the contrib/postfix scenarios, with the snippets the README tells admins to use ---------------
CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "postfix"


class Scenario:
    """contrib/postfix/NAME/mjfilter.yaml run for real: its endpoints moved to sinks."""

    def __init__(self, base: Path, name: str, edit: Any, relay_port: int) -> None:
        import shutil

        import yaml

        self.dir = base / name
        shutil.copytree(CONTRIB / name, self.dir)
        doc = yaml.safe_load((self.dir / "mjfilter.yaml").read_text())
        doc["state_dir"] = str(base / "state")
        doc["routing"]["socketmap"] = f"inet:127.0.0.1:{free_port()}"
        edit(self.dir, doc)
        # The daemon's file lives elsewhere: keep relative map paths pointing at the copies.
        for src in doc["routing"].get("sender_maps", []):
            for k, v in (src.get("postfix") or {}).items():
                src["postfix"][k] = str(self.dir / v)
        # milter.listen: the daemon's own free port
        self.daemon = Daemon(base / "mj", doc["chain"], **{k: v for k, v in doc.items() if k not in ("chain", "milter")})
        self.pf: PostfixRig | None = None
        try:
            self.daemon.start()
            self.pf = PostfixRig(base / "pf", relay_port=relay_port, main_cf=world_main_cf(self.daemon),
                                 master_cf=self.daemon.postfix_config("master")).start()
        except BaseException:
            self.close()
            raise

    def send(self, sender: str, extra: list[str] | None = None) -> int:
        assert self.pf is not None
        return smtp_send(self.pf.smtp_port, sender, ["bob@example.org"], message(extra, sender)).code

    def close(self) -> None:
        if self.pf is not None:
            self.pf.stop()
        self.daemon.stop()


def test_contrib_mailjet_scenario(tmp_path: Path) -> None:
    # Two senders through "Mailjet" (one sink that requires STARTTLS, as tls: required says,
    # and knows both API keys), everything else to the MX (Postfix's relayhost here).
    mailjet = Sink(users={"apikey": "secretkey", "apikey2": "secretkey2"}, starttls=True).start()
    mx = Sink().start()

    def edit(d: Path, doc: dict[str, Any]) -> None:
        text = (d / "sender_relay").read_text()
        assert "in.mailjet.com" in text
        (d / "sender_relay").write_text(text.replace("in.mailjet.com", f"[127.0.0.1]:{mailjet.port}"))

    sc = Scenario(tmp_path, "mailjet", edit, relay_port=mx.port)
    try:
        for sender, user in (("shop@example.com", "apikey"), ("example@example.net", "apikey2")):
            assert sc.send(sender) == 250
            got = only(mailjet)
            assert (got.mail_from, got.auth_user, got.tls) == (sender, user, True)
        assert sc.send("someone@example.org") == 250
        got = only(mx)
        assert got.auth_user is None and not got.headers("X-Mjfilter-Route")
        assert not mailjet.messages
    finally:
        sc.close()
        mailjet.stop()
        mx.stop()


def test_contrib_mailerq_scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    relay = Sink(users={"mailerq": "relay-pw"}).start()
    customer = Sink(users={"cust": MQ_PASSWORD}).start()
    mx = Sink().start()
    monkeypatch.setenv("MJFILTER_SMARTHOST_PASSWORD", "relay-pw")

    def edit(d: Path, doc: dict[str, Any]) -> None:
        r = doc["routing"]
        r["smarthosts"]["relay"].update(host="127.0.0.1", port=relay.port)
        r["smarthosts"]["relay"]["password"] = {"$env": "MJFILTER_SMARTHOST_PASSWORD"}
        r["per_message"]["allow"][0]["hosts"].append("127.0.0.1")  # the test's "customer" relay
        r["per_message"]["ports"].append(customer.port)

    sc = Scenario(tmp_path, "mailerq", edit, relay_port=mx.port)
    try:
        assert sc.send("news@app.example") == 250  # no header: the global smarthost
        got = only(relay)
        assert got.auth_user == "mailerq"
        assert sc.send("news@app.example", mq_headers(port=customer.port, user="cust")) == 250
        got = only(customer)
        assert got.auth_user == "cust" and MQ_PASSWORD.encode() not in got.data
        # Not allowed for this sender: refused, not silently sent elsewhere.
        assert sc.send("other@else.example", mq_headers(port=customer.port, user="cust")) == 550
        assert not mx.messages and not relay.messages and not customer.messages
    finally:
        sc.close()
        for s in (relay, customer, mx):
            s.stop()
