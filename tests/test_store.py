"""The store contract: the same tests against SQLite and a real redis-server."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from mjfilter.store import CLAIMED, HELD, TAKEN, StoreUnavailable, SuppressionEntry, normalize_entry, open_store
from redis_rig import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path / 'state.db'}", timeout=2)
    else:
        server = request.getfixturevalue("redis_server")
        s = open_store(server.url, timeout=2, prefix=f"t{time.monotonic_ns()}:")
    yield s
    s.close()


def test_kv(store):
    assert store.get("k") is None
    store.put("k", "v1")
    assert store.get("k") == "v1"
    assert store.put_if_absent("k", "v2") == "v1"
    assert store.put_if_absent("k2", "v2") == "v2"
    store.ping()


def test_reserve_release_holder(store):
    assert store.reserve(["a", "b"], "m1") == [CLAIMED, CLAIMED]
    assert store.reserve(["a", "c"], "m2") == [TAKEN, CLAIMED]
    assert store.reserve(["a"], "m1") == [HELD]  # the same message again: never a duplicate
    assert store.holder("a") == "m1" and store.holder("c") == "m2" and store.holder("zz") is None
    assert store.release(["a", "c"], "m1") == 1  # c is m2's: compare-and-delete leaves it
    assert store.holder("a") is None and store.holder("c") == "m2"
    assert store.reserve(["a"], "m2") == [CLAIMED]
    assert store.reserve([], "m3") == []


def test_reservation_expiry(store):
    assert store.reserve(["t"], "m1", ttl=0.3) == [CLAIMED]
    assert store.reserve(["t"], "m2", ttl=0.3) == [TAKEN]
    time.sleep(0.5)
    assert store.holder("t") is None
    assert store.reserve(["t"], "m2") == [CLAIMED]


def test_reserve_is_atomic_under_concurrency(store):
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(20)

    def race(i: int) -> None:
        barrier.wait()
        got = store.reserve(["race", f"own-{i}"], f"holder-{i}")
        with lock:
            results.append(bool(got[0]))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [False] * 19 + [True]


def test_suppression(store):
    n = store.suppress_add([
        SuppressionEntry("unsubscribe", normalize_entry("Bob@Example.org"), 550, "unsubscribed 2026-01-01"),
        SuppressionEntry("unsubscribe", normalize_entry("blocked.example")),
        SuppressionEntry("unsubscribe", normalize_entry("vip@blocked.example"), None, "address entry"),
        SuppressionEntry("bounce", normalize_entry("gone@example.net"), 550, "3 hard bounces"),
    ])
    assert n == 4
    hits = store.suppressed("unsubscribe", ["bob@example.org", "BOB@EXAMPLE.ORG", "x@blocked.example",
                                            "vip@blocked.example", "free@example.org"])
    assert hits["bob@example.org"].code == 550 and hits["bob@example.org"].reason == "unsubscribed 2026-01-01"
    assert hits["BOB@EXAMPLE.ORG"].entry == "bob@example.org"
    assert hits["x@blocked.example"].entry == "@blocked.example"
    assert hits["vip@blocked.example"].reason == "address entry"  # the address entry wins over the domain's
    assert "free@example.org" not in hits
    assert set(store.suppressed("bounce", ["gone@example.net", "bob@example.org"])) == {"gone@example.net"}
    assert [e.entry for e in store.suppress_entries("unsubscribe")] == [
        "@blocked.example", "bob@example.org", "vip@blocked.example"]
    assert len(store.suppress_entries()) == 4
    assert store.suppress_remove("unsubscribe", "bob@example.org") is True
    assert store.suppress_remove("unsubscribe", "bob@example.org") is False
    assert "bob@example.org" not in store.suppressed("unsubscribe", ["bob@example.org"])


def test_normalize_entry():
    assert normalize_entry(" Bob@Example.ORG ") == "bob@example.org"
    assert normalize_entry("Example.org") == "@example.org"
    for bad in ("", "a b@c", "a@b@c", "user@"):
        with pytest.raises(ValueError):
            normalize_entry(bad)


def test_bounce_counts(store):
    assert [store.record_bounce("Gone@Example.net") for _ in range(3)] == [1, 2, 3]
    assert store.record_bounce("other@example.net") == 1


def test_campaigns(store):
    store.campaign_add("alice", "spring", messages=1, delivered=2)
    store.campaign_add("alice", "spring", messages=1, delivered=0, blocked=1)
    store.campaign_add("-", "autumn", messages=1, delivered=1)
    stats = {(c.tenant, c.campaign): c for c in store.campaigns()}
    s = stats[("alice", "spring")]
    assert (s.messages, s.delivered, s.blocked) == (2, 2, 1)
    assert s.first_seen is not None and s.last_seen is not None and s.first_seen <= s.last_seen
    assert stats[("-", "autumn")].delivered == 1


def test_events(store):
    store.add_events([{"event": "blocked", "email": f"r{i}@example.org", "n": i} for i in range(5)])
    assert [e["n"] for e in store.events(limit=3)] == [2, 3, 4]
    assert store.events(limit=100)[0]["event"] == "blocked"


def test_check(store):
    store.reserve(["x"], "m")
    report = store.check()
    assert report["ok"] is True and report["backend"] in ("sqlite", "redis")


def test_sqlite_locked_past_timeout_is_unavailable(tmp_path):
    path = tmp_path / "state.db"
    s = open_store(f"sqlite:///{path}", timeout=0.3)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            s.reserve(["k"], "m")
        assert time.monotonic() - t0 < 5
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert s.reserve(["k"], "m") == [True]
    assert s.check()["ok"] is True
    s.close()


def test_redis_down_is_unavailable(tmp_path):
    with RedisServer(tmp_path / "r") as server:
        s = open_store(server.url, timeout=0.5)
        assert s.reserve(["k"], "m") == [True]
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        s.reserve(["k2"], "m")
    with pytest.raises(StoreUnavailable):
        s.ping()
    assert time.monotonic() - t0 < 10
    s.close()


def test_sqlite_connections_stay_bounded_with_a_thread_per_connection(tmp_path):
    """libmilter runs each MTA connection on a new thread: the store must not keep a connection per thread."""
    import os

    path = tmp_path / "state.db"
    s = open_store(f"sqlite:///{path}", timeout=2)

    def open_files() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd")
                   if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(path)))

    for i in range(200):
        t = threading.Thread(target=lambda i=i: s.reserve([f"k{i}"], "m"))
        t.start()
        t.join()
    assert open_files() <= 3 * 8  # the db, its WAL and shm per pooled connection at most
    s.close()
    assert open_files() == 0
