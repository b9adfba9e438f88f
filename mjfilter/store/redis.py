"""The shared Redis store: several MTA hosts or mjfilter processes share one state.

Every key lives under ``prefix`` (default ``mjfilter:``), so several deployments
(and the tests) can share one server:

==============================  ==========  ============================================
key                             type        holds
==============================  ==========  ============================================
``P kv:<key>``                  string      key/value state
``P hold:<key>``                string      a reservation: the holder (PX ttl, or none)
``P suppress:<list>``           hash        entry -> JSON ``{code, reason, added}``
``P lists``                     set         the names of the suppression lists
``P bounces``                   hash        lowercased address -> permanent bounce count
``P campaign:<tenant>:<name>``  hash        messages, delivered, blocked, first/last_seen
``P campaigns``                 sorted set  ``<tenant>:<name>`` scored by last_seen
``P events``                    list        JSON events, the newest ``keep_events``
==============================  ==========  ============================================

``<tenant>`` and ``<name>`` are percent-encoded (``urllib.parse.quote(safe="")``),
so spaces, ``@`` and ``:`` cannot make two campaigns collide.

Reservations are claimed and released by Lua scripts (one round-trip each,
atomic on the server). The scripts touch several keys, which Redis Cluster
only allows within one hash slot: use a single primary (with replicas and
Sentinel for failover), not Cluster.

Every redis error becomes ``StoreUnavailable`` (the engine answers 451 4.3.0),
bounded by ``timeout``: redis-py's retries are switched off, so a server that is
down costs one connect timeout, never a retry loop.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import CampaignStats, StoreUnavailable, SuppressionEntry, lookup_keys, mask_url, normalize_entry

log = logging.getLogger(__name__)

T = TypeVar("T")

#: seconds between the PING redis-py sends before reusing an idle pooled connection
HEALTH_CHECK_INTERVAL = 30
#: ``check()`` stops counting keys after this many SCAN calls (COUNT 1000 each) or this many seconds
SCAN_MAX_CALLS = 10_000
SCAN_MAX_SECONDS = 30.0

# KEYS: the reservation keys. ARGV[1]: holder; ARGV[2]: ttl in ms, "" for none.
# Per key: 1 when it is now held by the holder (it was free, or already theirs:
# the ttl is then left alone), 0 when another holder has it.
RESERVE_LUA = """
local holder = ARGV[1]
local ttl = tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  if not current then
    if ttl then
      redis.call('SET', key, holder, 'PX', ttl)
    else
      redis.call('SET', key, holder)
    end
    out[i] = 1
  elseif current == holder then
    out[i] = 2
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: the reservation keys. ARGV[1]: holder. Deletes the keys it still holds; returns how many.
RELEASE_LUA = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""

# KEYS[1]: the key. ARGV[1]: the value. Returns the value kept.
PUT_IF_ABSENT_LUA = """
local current = redis.call('GET', KEYS[1])
if current then
  return current
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""


def _password(url: str) -> str | None:
    """The password ``url`` carries (to scrub it from error texts), or None."""
    try:
        parts = urlsplit(url)
        if parts.password:
            return unquote(parts.password)
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            if k.lower() == "password" and v:
                return v
    except ValueError:
        pass
    return None


def _campaign_id(tenant: str, campaign: str) -> str:
    """``tenant:campaign``, both percent-encoded: ``:`` inside either cannot collide."""
    return f"{quote(tenant, safe='')}:{quote(campaign, safe='')}"


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int:
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0


class RedisStore:
    """The ``Store`` contract on one Redis server, through a thread-safe connection pool.

    :param url: ``redis://[[user]:password@]host:port/db``, ``rediss://...`` or
        ``unix:///path/to/socket?db=0``.
    :param timeout: seconds for connecting and for each reply; past it the call
        raises ``StoreUnavailable``.
    :param prefix: put before every key.
    :param keep_events: how many of the most recent events the log keeps (0: no limit,
        as in the SQLite store).
    """

    def __init__(self, url: str, timeout: float = 5.0, prefix: str = "mjfilter:", keep_events: int = 100000) -> None:
        self.url = mask_url(url)
        self.timeout = timeout
        self.prefix = prefix
        self.keep_events = max(0, keep_events)
        self._secret = _password(url)
        try:
            self._redis = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout,
                health_check_interval=HEALTH_CHECK_INTERVAL, decode_responses=True,
                retry=Retry(NoBackoff(), 0))
        except ValueError as e:  # bad url or bad query option: a configuration error, not an outage
            raise ValueError(f"bad redis url {self.url}: {self._scrub(str(e))}") from None
        self._reserve = self._redis.register_script(RESERVE_LUA)
        self._release = self._redis.register_script(RELEASE_LUA)
        self._put_if_absent = self._redis.register_script(PUT_IF_ABSENT_LUA)

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r})"

    # -- plumbing ------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one round-trip; any redis error becomes ``StoreUnavailable``."""
        try:
            return fn()
        except redis.RedisError as e:
            raise StoreUnavailable(
                f"redis {self.url} ({what}): {type(e).__name__}: {self._scrub(str(e))}") from None

    def _k(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}{kind}{name}"

    # -- key/value ---------------------------------------------------------------------
    def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the server answers."""
        self._call("ping", self._redis.ping)

    def get(self, key: str) -> str | None:
        """The value kept under ``key``, or None."""
        return cast("str | None", self._call("get", lambda: self._redis.get(self._k("kv:", key))))

    def put(self, key: str, value: str) -> None:
        """Keep ``value`` under ``key`` (replacing any previous value)."""
        self._call("put", lambda: self._redis.set(self._k("kv:", key), value))

    def put_if_absent(self, key: str, value: str) -> str:
        """Keep ``value`` under ``key`` unless a value is there; return the value kept."""
        kept = self._call("put_if_absent", lambda: self._put_if_absent(keys=[self._k("kv:", key)], args=[value]))
        return str(kept)

    # -- reservations -----------------------------------------------------------------------
    def reserve(self, keys: Sequence[str], holder: str, ttl: float | None = None) -> list[int]:
        """Claim every key for ``holder``, atomically, in one round-trip (a Lua script).

        CLAIMED (1) per key when it was free or expired, HELD (2) when it
        already was ``holder``'s (its ttl is left as it was), TAKEN (0) when
        another holder has it. ``ttl`` seconds (None: forever) applies to newly
        claimed keys, rounded up to the millisecond.
        """
        if not keys:
            return []
        ms = "" if ttl is None else str(max(1, math.ceil(ttl * 1000)))
        names = [self._k("hold:", k) for k in keys]
        got = self._call("reserve", lambda: self._reserve(keys=names, args=[holder, ms]))
        return [int(x) for x in cast("list[Any]", got)]

    def release(self, keys: Sequence[str], holder: str) -> int:
        """Free the keys still held by ``holder`` (compare-and-delete); return how many."""
        if not keys:
            return 0
        names = [self._k("hold:", k) for k in keys]
        return int(self._call("release", lambda: self._release(keys=names, args=[holder])))

    def holder(self, key: str) -> str | None:
        """Who holds ``key`` now (None when free or expired)."""
        return cast("str | None", self._call("holder", lambda: self._redis.get(self._k("hold:", key))))

    # -- suppression ---------------------------------------------------------------------------
    @staticmethod
    def _entry(list_name: str, entry: str, raw: str) -> SuppressionEntry:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            code = data.get("code")
            reason = data.get("reason")
            return SuppressionEntry(list_name, entry, int(code) if code is not None else None,
                                    str(reason) if reason is not None else None, _float(data.get("added")) or 0.0)
        except (ValueError, TypeError):
            # The entry is there: it still suppresses (fail closed), without its code and reason.
            log.warning("suppression list %s: entry %s has an unreadable value", list_name, entry)
            return SuppressionEntry(list_name, entry, None, None, 0.0)

    def suppress_add(self, entries: Iterable[SuppressionEntry]) -> int:
        """Add or replace entries; return how many were written."""
        by_list: dict[str, dict[str, str]] = {}
        n = 0
        for e in entries:
            value = json.dumps({"code": e.code, "reason": e.reason, "added": e.added}, ensure_ascii=False)
            by_list.setdefault(e.list, {})[normalize_entry(e.entry)] = value
            n += 1
        if not by_list:
            return 0

        def write() -> None:
            with self._redis.pipeline(transaction=True) as p:
                p.sadd(self._k("lists"), *by_list)
                for list_name, mapping in by_list.items():
                    p.hset(self._k("suppress:", list_name), mapping=cast("dict[Any, Any]", mapping))
                p.execute()

        self._call("suppress_add", write)
        return n

    def suppress_remove(self, list_name: str, entry: str) -> bool:
        """Remove one entry (normalised first when it is an address or domain); True when it was there."""
        try:
            field = normalize_entry(entry)
        except ValueError:
            field = entry
        return bool(self._call("suppress_remove", lambda: self._redis.hdel(self._k("suppress:", list_name), field)))

    def suppressed(self, list_name: str, addresses: Sequence[str]) -> dict[str, SuppressionEntry]:
        """For each address suppressed on ``list_name`` (by itself or its domain), its entry.

        One HMGET of every address and domain; the address entry wins over the
        domain entry; the result is keyed by the addresses as given.
        """
        if not addresses:
            return {}
        lookups = {a: lookup_keys(a) for a in addresses}
        fields = list(dict.fromkeys(f for pair in lookups.values() for f in pair))
        values = self._call("suppressed", lambda: self._redis.hmget(self._k("suppress:", list_name), fields))
        found = {f: v for f, v in zip(fields, cast("list[str | None]", values)) if v is not None}
        hits: dict[str, SuppressionEntry] = {}
        for address, (own, domain) in lookups.items():
            for f in (own, domain):
                if f in found:
                    hits[address] = self._entry(list_name, f, found[f])
                    break
        return hits

    def suppress_entries(self, list_name: str | None = None) -> list[SuppressionEntry]:
        """Every entry of one list (or of all lists), sorted by list and entry."""

        def read() -> list[tuple[str, dict[str, str]]]:
            names: list[str] = ([list_name] if list_name is not None
                                else sorted(cast("set[str]", self._redis.smembers(self._k("lists")))))
            if not names:
                return []
            with self._redis.pipeline(transaction=False) as p:
                for name in names:
                    p.hgetall(self._k("suppress:", name))
                return list(zip(names, p.execute()))

        out = [self._entry(name, entry, raw)
               for name, mapping in self._call("suppress_entries", read) for entry, raw in mapping.items()]
        out.sort(key=lambda e: (e.list, e.entry))
        return out

    def record_bounce(self, address: str) -> int:
        """Count one more permanent bounce for ``address`` (lowercased); return its total."""
        field = address.strip().lower()
        return int(self._call("record_bounce", lambda: self._redis.hincrby(self._k("bounces"), field, 1)))

    # -- campaigns and events ---------------------------------------------------------------
    def campaign_add(self, tenant: str, campaign: str, messages: int = 0, delivered: int = 0,
                     blocked: int = 0) -> None:
        """Add to a campaign's counters and set its first/last seen, in one MULTI/EXEC."""
        cid = _campaign_id(tenant, campaign)
        key = self._k("campaign:", cid)
        now = time.time()

        def write() -> None:
            with self._redis.pipeline(transaction=True) as p:
                p.hincrby(key, "messages", messages)
                p.hincrby(key, "delivered", delivered)
                p.hincrby(key, "blocked", blocked)
                p.hsetnx(key, "first_seen", repr(now))
                p.hset(key, mapping={"last_seen": repr(now), "tenant": tenant, "campaign": campaign})
                p.zadd(self._k("campaigns"), {cid: now})
                p.execute()

        self._call("campaign_add", write)

    def campaigns(self) -> list[CampaignStats]:
        """Every campaign's counters, most recently seen first."""

        def read() -> list[tuple[str, dict[str, str]]]:
            ids = cast("list[str]", self._redis.zrevrange(self._k("campaigns"), 0, -1))
            if not ids:
                return []
            with self._redis.pipeline(transaction=False) as p:
                for cid in ids:
                    p.hgetall(self._k("campaign:", cid))
                return list(zip(ids, p.execute()))

        out: list[CampaignStats] = []
        for cid, h in self._call("campaigns", read):
            if not h:
                continue
            enc_tenant, _, enc_campaign = cid.partition(":")
            out.append(CampaignStats(
                tenant=h.get("tenant", unquote(enc_tenant)), campaign=h.get("campaign", unquote(enc_campaign)),
                messages=_int(h.get("messages")), delivered=_int(h.get("delivered")),
                blocked=_int(h.get("blocked")), first_seen=_float(h.get("first_seen")),
                last_seen=_float(h.get("last_seen"))))
        return out

    def add_events(self, events: Sequence[dict[str, Any]]) -> None:
        """Append events (JSON) to the log and trim it to the newest ``keep_events`` (0: no trim)."""
        if not events:
            return
        lines = [json.dumps(e, ensure_ascii=False, separators=(",", ":"), default=str) for e in events]
        key = self._k("events")

        def write() -> None:
            with self._redis.pipeline(transaction=True) as p:
                p.rpush(key, *lines)
                if self.keep_events:
                    p.ltrim(key, -self.keep_events, -1)
                p.execute()

        self._call("add_events", write)

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent ``limit`` events, oldest first."""
        if limit <= 0:
            return []
        lines = cast("list[str]", self._call("events", lambda: self._redis.lrange(self._k("events"), -limit, -1)))
        out: list[dict[str, Any]] = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                log.warning("event log %s: skipped an unreadable event", self._k("events"))
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    # -- maintenance ------------------------------------------------------------------------------
    def _count_keys(self) -> tuple[int, bool]:
        """Keys under the prefix (SCAN MATCH), and whether the count is complete."""
        pattern = _glob_escape(self.prefix) + "*"
        deadline = time.monotonic() + SCAN_MAX_SECONDS
        cursor, count = 0, 0
        for _ in range(SCAN_MAX_CALLS):
            cursor, batch = self._redis.scan(cursor=cursor, match=pattern, count=1000)
            count += len(batch)
            if cursor == 0:
                return count, True
            if time.monotonic() > deadline:
                break
        return count, False

    def check(self) -> dict[str, object]:
        """Health and size report for ``mjfilter store check``.

        ``ok`` is False when the server answers but cannot keep mjfilter's
        state safely: it refuses writes or scripts (read-only replica, MISCONF,
        ACL), or it may evict keys (``maxmemory`` with a policy other than
        ``noeviction``). Raises ``StoreUnavailable`` when it does not answer.
        """
        report: dict[str, object] = {"ok": False, "backend": "redis", "url": self.url, "prefix": self.prefix}
        problems: list[str] = []
        warnings: list[str] = []
        try:
            with self._redis.pipeline(transaction=False) as p:
                for section in ("server", "memory", "persistence", "replication"):
                    p.info(section)
                server, memory, persistence, replication = p.execute()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(f"redis {self.url} (check): {type(e).__name__}: {self._scrub(str(e))}") from None
        except redis.RedisError as e:
            problems.append(f"INFO failed: {type(e).__name__}: {self._scrub(str(e))}")
            server, memory, persistence, replication = {}, {}, {}, {}
        report["redis_version"] = server.get("redis_version")
        report["used_memory"] = memory.get("used_memory")
        report["maxmemory"] = memory.get("maxmemory")
        report["maxmemory_policy"] = memory.get("maxmemory_policy")
        report["role"] = replication.get("role")
        report["aof_enabled"] = bool(persistence.get("aof_enabled")) if persistence else None

        if replication.get("role") not in (None, "master"):
            problems.append(f"the server is a {replication.get('role')}: mjfilter must write to the primary")
        if _int(memory.get("maxmemory")) > 0 and memory.get("maxmemory_policy") not in (None, "noeviction"):
            problems.append(f"maxmemory-policy is {memory.get('maxmemory_policy')}: Redis may evict reservations "
                            "and suppression entries; set maxmemory-policy noeviction")
        if persistence and not persistence.get("aof_enabled"):
            warnings.append("appendonly is off: a restart loses what was written since the last snapshot "
                            "(who was already mailed, unsubscribes); set appendonly yes")
        for field in ("aof_last_write_status", "rdb_last_bgsave_status"):
            if persistence.get(field) not in (None, "ok"):
                problems.append(f"{field} is {persistence.get(field)}")

        # A probe reservation proves the scripts run and the server takes writes.
        probe = f"check:{time.time_ns()}"
        try:
            if self._reserve(keys=[self._k("hold:", probe)], args=["check", "60000"]) != [1]:
                problems.append("the reservation script gave an unexpected answer")
            self._release(keys=[self._k("hold:", probe)], args=["check"])
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(f"redis {self.url} (check): {type(e).__name__}: {self._scrub(str(e))}") from None
        except redis.RedisError as e:
            problems.append(f"cannot reserve a probe key: {type(e).__name__}: {self._scrub(str(e))}")

        try:
            report["keys"], report["keys_complete"] = self._count_keys()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(f"redis {self.url} (check): {type(e).__name__}: {self._scrub(str(e))}") from None
        except redis.RedisError as e:
            problems.append(f"SCAN failed: {type(e).__name__}: {self._scrub(str(e))}")
        report["problems"] = problems
        report["warnings"] = warnings
        report["ok"] = not problems
        return report

    def close(self) -> None:
        """Disconnect every pooled connection."""
        try:
            self._redis.close()
        except redis.RedisError as e:
            log.debug("closing %s: %s", self.url, self._scrub(str(e)))
