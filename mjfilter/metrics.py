"""Prometheus metrics: one ``Metrics`` per ``App``, each with its own registry.

Nothing here is module-global: an ``App`` makes a ``Metrics`` (tests make
several apps, each with its own counters), and ``mjfilter run`` serves that
app's registry when ``metrics.listen`` is set.

Labels hold only bounded values that carry no personal data: verdicts, step
names from the configuration, store operation names, event names and their
constant error texts. Never an address, a campaign, a header value or a
queue id (unbounded cardinality, and privacy).

The per-message cost is a few dict lookups and one ``inc``/``observe`` per
series touched: the children of every label value known in advance are made
once, the others are made on first use and cached here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from . import __version__
from .actions import Verdict
from .store import CampaignStats, Store, SuppressionEntry

if TYPE_CHECKING:  # pragma: no cover
    from .chain import Outcome

log = logging.getLogger(__name__)

# 0.1 ms .. 10 s, roughly 1-2.5-5 per decade: a step is usually well under 1 ms,
# a store round-trip a few ms, a stalled one up to store.timeout.
BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                              0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
VERDICTS: tuple[str, ...] = get_args(Verdict)
# Event label sets are plugin-defined constants; this caps them in case a plugin
# puts something variable in an event's ``error``: later pairs count as "other".
MAX_EVENT_SERIES = 64
MAX_LABEL_CHARS = 64
OTHER = "other"


class Metrics:
    """Every mjfilter metric, registered in a ``CollectorRegistry`` of its own.

    :param version: the value of ``mjfilter_build_info{version}``.
    :param process: also register the standard ``process_*`` metrics (CPU, RSS, open fds).
    """

    def __init__(self, version: str = __version__, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter("mjfilter_messages", "Transactions ended, by verdict.", ["verdict"], registry=r)
        self.step_seconds = Histogram("mjfilter_step_seconds", "Time each chain step took on a message "
                                      "(steps skipped by their when: rule are not observed).", ["step"],
                                      buckets=BUCKETS, registry=r)
        self.store_seconds = Histogram("mjfilter_store_seconds", "Time of each store call, failed ones included.",
                                       ["op"], buckets=BUCKETS, registry=r)
        self.store_errors = Counter("mjfilter_store_errors", "Store calls that raised (StoreUnavailable: down, "
                                    "locked past store.timeout, disk full).", ["op"], registry=r)
        self.reinject_failures = Counter("mjfilter_reinject_failures", "Transactions answered 451 because an "
                                         "extra copy could not be reinjected.", registry=r)
        self.events = Counter("mjfilter_events", "Events of final transactions (blocked recipients ...), by "
                              "event and error.", ["event", "error"], registry=r)
        self.in_flight = Gauge("mjfilter_transactions_in_flight", "Transactions between MAIL FROM and their end.",
                               registry=r)
        self.config_generation = Gauge("mjfilter_config_generation", "How many reloads the running "
                                       "configuration is from the one started with.", registry=r)
        self.build_info = Gauge("mjfilter_build_info", "Always 1; the version in a label.", ["version"], registry=r)
        self.build_info.labels(version=version).set(1)
        if process:
            ProcessCollector(registry=r)
        # children made once, looked up per message
        self._verdicts = {v: self.messages.labels(verdict=v) for v in VERDICTS}
        self._ops: dict[str, tuple[Any, Any]] = {}  # made on an operation's first call
        self._steps: dict[str, Any] = {}
        self._events: dict[tuple[str, str], Any] = {}
        self._events_lock = threading.Lock()
        for v in self._verdicts.values():  # every verdict shows, at 0, from the first scrape
            v.inc(0)

    # -- sampled on scrape ---------------------------------------------------------
    def watch(self, in_flight: Callable[[], float], generation: Callable[[], float]) -> None:
        """Read the in-flight count and the configuration generation when scraped (no per-message cost)."""
        self.in_flight.set_function(in_flight)
        self.config_generation.set_function(generation)

    # -- one transaction ---------------------------------------------------------------
    def transaction(self, outcome: "Outcome") -> None:
        """Count one ended transaction: its verdict, its steps' times and, when final, its events."""
        child = self._verdicts.get(outcome.verdict)
        if child is None:  # pragma: no cover - Verdict is a closed set
            child = self.messages.labels(verdict=OTHER)
        child.inc()
        steps = self._steps
        for t in outcome.trace:
            if t.step.startswith("(") or t.action.startswith("skipped"):
                continue  # "(chain)" notes and steps whose when: rule did not match
            h = steps.get(t.step)
            if h is None:
                h = steps[t.step] = self.step_seconds.labels(step=t.step)
            h.observe(t.ms / 1e3)
        if outcome.events and outcome.verdict != "tempfail":  # a tempfailed attempt's events come again
            for e in outcome.events:
                self._event(e.event, e.data.get("error")).inc()

    def _event(self, event: str, error: Any) -> Any:
        key = (event, "" if error is None else str(error))
        child = self._events.get(key)
        if child is not None:
            return child
        with self._events_lock:
            child = self._events.get(key)
            if child is None:
                if len(self._events) >= MAX_EVENT_SERIES:
                    log.warning("metrics: more than %d event/error pairs; counting the others as %r",
                                MAX_EVENT_SERIES, OTHER)
                    child = self.events.labels(event=OTHER, error=OTHER)
                else:
                    child = self.events.labels(event=key[0][:MAX_LABEL_CHARS], error=key[1][:MAX_LABEL_CHARS])
                self._events[key] = child
            return child

    def reinject_failed(self) -> None:
        self.reinject_failures.inc()

    # -- the store --------------------------------------------------------------------
    def instrument(self, store: Store) -> "InstrumentedStore":
        """``store`` wrapped so that every call is timed and every failure counted."""
        return store if isinstance(store, InstrumentedStore) else InstrumentedStore(store, self)

    def store_op(self, op: str) -> tuple[Any, Any]:
        """The (histogram, error counter) children of one store operation (a Store method name)."""
        children = self._ops.get(op)
        if children is None:
            children = self._ops[op] = (self.store_seconds.labels(op=op), self.store_errors.labels(op=op))
            children[1].inc(0)  # an operation's error count shows, at 0, from its first call
        return children


class InstrumentedStore:
    """A ``Store`` that forwards every call to ``inner``, timing it into ``mjfilter_store_seconds{op}``.

    A call that raises counts in ``mjfilter_store_errors_total{op}`` and raises on.
    Attributes not in the protocol are looked up on ``inner``.
    """

    def __init__(self, inner: Store, metrics: Metrics) -> None:
        self.inner = inner
        self.url: str = inner.url  # the inner store's url (its password masked)
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _call(self, op: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hist, errors = self._metrics.store_op(op)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception:
            errors.inc()
            raise
        finally:
            hist.observe(time.perf_counter() - t0)

    # -- key/value -------------------------------------------------------------
    def ping(self) -> None:
        self._call("ping", self.inner.ping)

    def get(self, key: str) -> str | None:
        result: str | None = self._call("get", self.inner.get, key)
        return result

    def put(self, key: str, value: str) -> None:
        self._call("put", self.inner.put, key, value)

    def put_if_absent(self, key: str, value: str) -> str:
        result: str = self._call("put_if_absent", self.inner.put_if_absent, key, value)
        return result

    # -- reservations ----------------------------------------------------------------
    def reserve(self, keys: Sequence[str], holder: str, ttl: float | None = None) -> list[int]:
        result: list[int] = self._call("reserve", self.inner.reserve, keys, holder, ttl)
        return result

    def release(self, keys: Sequence[str], holder: str) -> int:
        result: int = self._call("release", self.inner.release, keys, holder)
        return result

    def holder(self, key: str) -> str | None:
        result: str | None = self._call("holder", self.inner.holder, key)
        return result

    # -- suppression --------------------------------------------------------------------
    def suppress_add(self, entries: Iterable[SuppressionEntry]) -> int:
        result: int = self._call("suppress_add", self.inner.suppress_add, entries)
        return result

    def suppress_remove(self, list_name: str, entry: str) -> bool:
        result: bool = self._call("suppress_remove", self.inner.suppress_remove, list_name, entry)
        return result

    def suppressed(self, list_name: str, addresses: Sequence[str]) -> dict[str, SuppressionEntry]:
        result: dict[str, SuppressionEntry] = self._call("suppressed", self.inner.suppressed, list_name, addresses)
        return result

    def suppress_entries(self, list_name: str | None = None) -> list[SuppressionEntry]:
        result: list[SuppressionEntry] = self._call("suppress_entries", self.inner.suppress_entries, list_name)
        return result

    def record_bounce(self, address: str) -> int:
        result: int = self._call("record_bounce", self.inner.record_bounce, address)
        return result

    # -- campaigns and events -------------------------------------------------------------
    def campaign_add(self, tenant: str, campaign: str, messages: int = 0, delivered: int = 0,
                     blocked: int = 0) -> None:
        self._call("campaign_add", self.inner.campaign_add, tenant, campaign, messages, delivered, blocked)

    def campaigns(self) -> list[CampaignStats]:
        result: list[CampaignStats] = self._call("campaigns", self.inner.campaigns)
        return result

    def add_events(self, events: Sequence[dict[str, Any]]) -> None:
        self._call("add_events", self.inner.add_events, events)

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("events", self.inner.events, limit)
        return result

    # -- maintenance --------------------------------------------------------------------
    def check(self) -> dict[str, object]:
        result: dict[str, object] = self._call("check", self.inner.check)
        return result

    def close(self) -> None:
        self.inner.close()


__all__ = ["BUCKETS", "InstrumentedStore", "Metrics"]
