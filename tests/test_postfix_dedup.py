"""Issue 4 through a real Postfix: campaign dedup, suppression, the store under failure.

client -> Postfix (smtpd_milters = mjfilter run [, more]) -> aiosmtpd sink.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest

from mjd import Daemon, world_main_cf
from mjfilter.store import SuppressionEntry, open_store
from redis_rig import RedisServer, redis_server_path
from rig import PostfixRig, Sink, smtp_send

pytestmark = [pytest.mark.postfix]

CHAIN = [{"use": "headers"}, {"use": "suppression"}, {"use": "dedup"}]


def message(campaign: str | None = "spring", dedup: bool = True, to: str = "bob@example.org",
            extra: str = "", mid: str | None = None) -> bytes:
    head = ["From: Shop <app@shop.example>", f"To: {to}", "Subject: dedup test",
            f"Message-ID: <{mid or uuid.uuid4().hex}@shop.example>"]
    if campaign:
        head.append(f"X-Mailjet-Campaign: {campaign}")
    if dedup:
        head.append("X-Mailjet-DeduplicateCampaign: yes")
    if extra:
        head.append(extra)
    return ("\r\n".join(head) + "\r\n\r\nHello.\r\n").encode()


def wait_events(store, n: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        events = store.events(limit=1000)
        if len(events) >= n or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


class World:
    """A sink, mjfilter daemon(s) and a Postfix using them."""

    def __init__(self, base: Path, chain: list[dict], store: dict | None = None, second: Daemon | None = None,
                 after: Daemon | None = None) -> None:
        self.sink = Sink().start()
        self.daemon = Daemon(base / "mj", chain, **({"store": store} if store else {}))
        self.second, self.after = second, after
        self.pf: PostfixRig | None = None
        try:
            self.daemon.start()
            main = world_main_cf(self.daemon, *([after] if after else []))
            master = self.daemon.postfix_config("master")
            if second is not None:  # a second smtpd listener whose milter is the second daemon
                self.port2 = __import__("rig").free_port()
                master += (f"127.0.0.1:{self.port2} inet n - n - - smtpd\n"
                           f"  -o smtpd_milters={second.listen}\n")
            self.pf = PostfixRig(base / "pf", relay_port=self.sink.port, main_cf=main, master_cf=master).start()
        except BaseException:
            self.close()
            raise
        self.store = open_store(self.daemon_store_url(), timeout=5, prefix="mjfilter:")

    def daemon_store_url(self) -> str:
        import yaml

        doc = yaml.safe_load(self.daemon.conf.read_text())
        return (doc.get("store") or {}).get("url") or f"sqlite:///{doc['state_dir']}/mjfilter.db"

    def send(self, data: bytes, rcpts: list[str] | None = None, port: int | None = None) -> int:
        assert self.pf is not None
        return smtp_send(port or self.pf.smtp_port, "app@shop.example", rcpts or ["bob@example.org"], data).code

    def settle(self) -> list:
        assert self.pf is not None
        self.pf.wait_queue_empty(timeout=60)
        return self.sink.messages

    def close(self) -> None:
        if self.pf is not None:
            self.pf.stop()
        self.daemon.stop()
        self.sink.stop()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path, CHAIN)
    yield w
    w.store.close()
    w.close()


def test_campaign_dedup_one_arrives_the_duplicate_gets_a_blocked_event(world):
    assert world.send(message()) == 250
    assert world.send(message()) == 250  # accepted from the client, discarded: never relayed
    assert world.send(message(dedup=False)) == 250  # dedup off: delivered
    assert world.send(message(campaign="autumn")) == 250  # another campaign: delivered
    got = world.settle()
    assert len(got) == 3
    events = wait_events(world.store, 1)
    [blocked] = [e for e in events if e["event"] == "blocked"]
    assert blocked["email"] == "bob@example.org" and blocked["error"] == "duplicate in campaign"
    assert blocked["customcampaign"] == "spring"


def test_three_recipients_one_already_served_two_arrive_in_one_transaction(world):
    assert world.send(message(), ["bob@example.org"]) == 250
    rcpts = ["bob@example.org", "carol@example.org", "dave@example.org"]
    assert world.send(message(), rcpts) == 250
    got = world.settle()
    assert len(got) == 2
    assert sorted(got[1].rcpt_tos) == ["carol@example.org", "dave@example.org"]


def race(world: World, n: int, ports: list[int]) -> list[int]:
    codes: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        data = message(mid=f"race-{i}-{uuid.uuid4().hex}")
        barrier.wait()
        code = world.send(data, ["race@example.org"], port=ports[i % len(ports)])
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return codes


def test_fifty_concurrent_sessions_exactly_one_arrives_sqlite(world):
    codes = race(world, 50, [world.pf.smtp_port])
    assert codes == [250] * 50
    got = world.settle()
    assert len(got) == 1 and got[0].rcpt_tos == ["race@example.org"]
    assert len([e for e in wait_events(world.store, 49) if e["event"] == "blocked"]) == 49


@pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not installed: run make test")
def test_fifty_concurrent_sessions_two_mjfilter_processes_sharing_redis(tmp_path):
    with RedisServer(tmp_path / "redis") as redis:
        store = {"url": redis.url, "timeout": 2}
        second = Daemon(tmp_path / "mj2", CHAIN, store=store).start()
        try:
            w = World(tmp_path, CHAIN, store=store, second=second)
            try:
                codes = race(w, 50, [w.pf.smtp_port, w.port2])
                assert codes == [250] * 50
                got = w.settle()
                assert len(got) == 1
                # both processes served part of the race
                assert "mjfilter.txn[" in w.daemon.log() and "mjfilter.txn[" in second.log()
            finally:
                w.store.close()
                w.close()
        finally:
            second.stop()


def test_retry_after_a_later_milter_tempfailed_arrives_exactly_once(tmp_path):
    after = Daemon(tmp_path / "flaky", [{"use": "test-flaky"}]).start()
    try:
        w = World(tmp_path, CHAIN, after=after)
        try:
            data = message(mid="retry-1")
            assert w.send(data) == 451  # mjfilter accepted and reserved, the later milter said 4xx
            assert w.send(data) == 250  # the client's retry of the same message: not a duplicate
            assert w.send(message()) == 250  # a different message of the campaign: a duplicate now
            got = w.settle()
            assert len(got) == 1 and b"Message-ID: <retry-1@shop.example>" in got[0].data
        finally:
            w.store.close()
            w.close()
    finally:
        after.stop()


@pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not installed: run make test")
def test_redis_stopped_during_load_gives_4xx_never_5xx_and_nothing_is_lost_or_doubled(tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    w = World(tmp_path, CHAIN, store={"url": redis.url, "timeout": 1})
    try:
        pending = [(f"r{i}@example.org", message(mid=f"load-{i}", to=f"r{i}@example.org")) for i in range(30)]
        codes: dict[str, int] = {}
        for i, (rcpt, data) in enumerate(pending):
            if i == 10:
                redis.stop()
            if i == 20:
                redis.start()
            codes[rcpt] = w.send(data, [rcpt])
        assert all(c in (250, 451) for c in codes.values()), codes
        assert 451 in codes.values() and 250 in codes.values()
        # clients retry what got 4xx
        for rcpt, data in pending:
            if codes[rcpt] != 250:
                assert w.send(data, [rcpt]) == 250
        got = w.settle()
        assert sorted(r.rcpt_tos[0] for r in got) == sorted(rcpt for rcpt, _ in pending)
    finally:
        w.store.close()
        w.close()
        redis.stop()


def test_sqlite_locked_past_the_timeout_gives_451_and_store_check_is_clean(tmp_path):
    w = World(tmp_path, CHAIN, store={"url": f"sqlite:///{tmp_path / 'locked.db'}", "timeout": 0.5})
    try:
        assert w.send(message()) == 250
        db = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        try:
            assert w.send(message(to="x@example.org"), ["x@example.org"]) == 451
        finally:
            db.execute("ROLLBACK")
            db.close()
        assert w.send(message(to="x@example.org"), ["x@example.org"]) == 250
        assert len(w.settle()) == 2
        r = w.daemon.mjfilter("store", "check")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        w.store.close()
        w.close()


def test_mxm_flags_unsubscribe_and_bounce_lists(world):
    world.store.suppress_add([SuppressionEntry("unsubscribe", "gone@example.org", 550, "unsubscribed"),
                              SuppressionEntry("bounce", "dead@example.org", 550, "3 hard bounces")])
    # unsubscribe list checked only when X-Mxm-Flags bit 4 asks
    assert world.send(message(campaign=None, dedup=False, to="gone@example.org", extra="X-Mxm-Flags: 4"),
                      ["gone@example.org"]) == 550
    assert world.send(message(campaign=None, dedup=False, to="gone@example.org"), ["gone@example.org"]) == 250
    # bounce list checked by default, skipped with bit 8
    assert world.send(message(campaign=None, dedup=False, to="dead@example.org"), ["dead@example.org"]) == 550
    assert world.send(message(campaign=None, dedup=False, to="dead@example.org", extra="X-Mxm-Flags: 8"),
                      ["dead@example.org"]) == 250
    got = world.settle()
    assert sorted(g.rcpt_tos[0] for g in got) == ["dead@example.org", "gone@example.org"]
    blocked = [e for e in wait_events(world.store, 2) if e["event"] == "blocked"]
    assert sorted(e["email"] for e in blocked) == ["dead@example.org", "gone@example.org"]


@pytest.fixture
def tiny_fs(tmp_path):
    """A 512 KiB tmpfs (needs root, as `make test` runs); unmounted afterwards."""
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write until the filesystem says ENOSPC."""
    import errno

    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_disk_full_gives_451_and_store_check_is_clean_afterwards(tmp_path, tiny_fs):
    w = World(tmp_path, CHAIN, store={"url": f"sqlite:///{tiny_fs / 'state.db'}", "timeout": 1})
    try:
        assert w.send(message()) == 250  # the database exists and works
        fill(tiny_fs / "filler")
        codes = [w.send(message(to=f"full{i}@example.org"), [f"full{i}@example.org"]) for i in range(5)]
        assert 451 in codes and all(c in (250, 451) for c in codes), codes  # 4xx, never 5xx
        (tiny_fs / "filler").unlink()
        for i, code in enumerate(codes):  # the clients retry
            if code != 250:
                assert w.send(message(to=f"full{i}@example.org"), [f"full{i}@example.org"]) == 250
        assert len(w.settle()) == 6
        r = w.daemon.mjfilter("store", "check")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        w.store.close()
        w.close()
