"""The running application: configuration, plugin chain, store, event loop, reload.

A ``Runtime`` is one configuration made ready (plugins loaded, step configs
validated, steps started). ``App`` holds the current runtime and swaps it on
reload; a transaction keeps the runtime it started with until it ends, and a
replaced runtime is shut down once its last transaction has ended.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chain import Chain, Outcome, build_steps, tempfail_outcome
from .config import ConfigError, LoadedConfig, load_config
from .logsetup import escape
from .metrics import Metrics
from .model import Transaction
from .plugins import Hooks, PluginError, PluginInfo, load_plugins, make_plugin_manager, pending_awaitables
from .routing import MapFileError, Router, RoutingError, open_router
from .routing.vault import Intake
from .store import Store, StoreUnavailable, open_store

log = logging.getLogger(__name__)
summary_log = logging.getLogger("mjfilter.txn")


@dataclass(slots=True)
class Runtime:
    loaded: LoadedConfig
    hooks: Hooks
    plugins: dict[str, PluginInfo]
    chain: Chain
    router: Router
    generation: int = 0
    active: int = 0
    retired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def config(self) -> Any:
        return self.loaded.config


def prepare(loaded: LoadedConfig) -> Runtime:
    """Load the plugins the chain names and validate every step; raise ``ConfigError``."""
    pm = make_plugin_manager()
    names = [s.use for s in loaded.config.chain]
    try:
        infos = load_plugins(pm, names)
    except PluginError as e:
        # point at the first step that uses the failing plugin
        idx = next((i for i, s in enumerate(loaded.config.chain) if f"{s.use!r}" in str(e)), None)
        where = ("chain", idx, "use") if idx is not None else ("chain",)
        raise ConfigError([loaded.locate(where, str(e))]) from None
    hooks = Hooks(pm)
    steps = build_steps(loaded, hooks)
    cfg = loaded.config
    try:
        router = open_router(cfg.routing, loaded.path.resolve().parent, cfg.state_dir)
    except (MapFileError, ValueError) as e:
        raise ConfigError([loaded.locate(("routing", "sender_maps"), str(e))]) from None
    if cfg.routing.enabled and not any(s.use == "route" for s in cfg.chain):
        raise ConfigError([loaded.locate(("routing",), "routing is configured but no chain step uses the "
                                                      "`route` plugin: add `- use: route` to the chain")])
    return Runtime(loaded, hooks, infos, Chain(steps, hooks), router)



class App:
    """What plugins get as ``app``: ``config``, ``store``, ``state_dir``, ``secret()``.

    ``metrics`` (a ``mjfilter.metrics.Metrics`` with a registry of its own) counts
    every transaction in ``end``; ``store`` is wrapped so that its calls are timed.
    """

    def __init__(self, loaded: LoadedConfig, store: Store | None = None) -> None:
        self.config_path = loaded.path
        self._runtime = prepare(loaded)
        self._runtime_lock = threading.Lock()
        self.state_dir: Path = loaded.config.state_dir
        self.metrics = Metrics()
        self._store = self.metrics.instrument(store) if store is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._started = False
        self._active = 0  # transactions between MAIL FROM and their end, over all runtimes
        self._idle = threading.Condition()
        self.draining = False  # set on shutdown: new transactions are refused with 451
        self._intake = Intake()  # credential headers per Postfix cleanup process (kept over reloads)
        self.metrics.watch(in_flight=lambda: self._active, generation=lambda: self._runtime.generation)

    # -- what plugins use -----------------------------------------------------
    @property
    def config(self) -> Any:
        """The current core configuration (``mjfilter.config.Config``)."""
        return self._runtime.config

    @property
    def store(self) -> Store:
        """The state store, opened on first use (every call timed into ``metrics``)."""
        if self._store is None:
            cfg = self._runtime.config
            self._store = self.metrics.instrument(
                open_store(cfg.store_url, cfg.store.timeout, base=self.config_path.resolve().parent,
                           prefix=cfg.store.prefix, keep_events=cfg.store.keep_events))
        return self._store

    @property
    def router(self) -> Router:
        """Next-hop rules of the current configuration (``mjfilter.routing.Router``)."""
        return self._runtime.router

    def table_lookup(self, table: str, key: str, conn: int = 0) -> tuple[str, str]:
        """A Postfix table lookup for the socketmap front end: (status, data).

        status is OK, NOTFOUND or TEMP; the data of OK may be a credential and is
        never logged. ``conn`` numbers the client connection (the ``credential``
        table keeps state per Postfix cleanup process).
        """
        try:
            router = self._runtime.router
            if table == "credential":
                value = self._intake.header(router.vault, self.store, conn, key)
            else:
                value = router.lookup(table, key, self.store)
        except (RoutingError, StoreUnavailable) as e:
            log.warning("socketmap %s: %s", table, e)
            return ("TEMP", str(e) if isinstance(e, RoutingError) else "store unavailable")
        return ("OK", value) if value else ("NOTFOUND", "")

    def table_lookup_blocks(self, table: str, key: str) -> bool:
        """Whether ``table_lookup`` may wait on I/O (else the socketmap answers on its loop)."""
        return self._runtime.router.blocking(table, key)

    def secret(self, name: str, nbytes: int = 32) -> str:
        """A secret made on first use and kept in the store (shared by every node on Redis).

        Atomic: when several processes make one at once, all of them get the one kept.
        """
        return self.store.put_if_absent(f"secret:{name}", secrets.token_hex(nbytes))

    # -- lifecycle -------------------------------------------------------------
    @property
    def runtime(self) -> Runtime:
        return self._runtime

    def start(self) -> None:
        """Start the event loop thread and every step (``mjfilter_startup``)."""
        if self._started:
            return
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="mjfilter-loop", daemon=True)
        self._loop_thread.start()
        self._startup(self._runtime)
        self._started = True

    def _startup(self, rt: Runtime) -> None:
        for step in rt.chain.steps:
            pending = pending_awaitables(rt.hooks.startup(step.plugin, self, step.config, step.name))
            if pending:
                self.resolve(pending)

    def _shutdown(self, rt: Runtime) -> None:
        for step in rt.chain.steps:
            try:
                pending = pending_awaitables(rt.hooks.shutdown(step.plugin, self, step.config, step.name))
                if pending:
                    self.resolve(pending)
            except Exception:
                log.exception("step %s: mjfilter_shutdown failed", step.name)
        rt.router.close()

    def reload(self) -> str:
        """Re-read the configuration file; on any error keep the running chain and raise."""
        loaded = load_config(self.config_path)
        new = prepare(loaded)
        old_cfg = self._runtime.config
        try:
            self._startup(new)
        except Exception as e:
            self._shutdown(new)
            raise ConfigError([loaded.locate(("chain",), f"a step failed to start: {type(e).__name__}: {e}")]) from e
        with self._runtime_lock:
            old = self._runtime
            new.generation = old.generation + 1
            self._runtime = new
        warnings = []
        if (loaded.config.routing.socketmap, loaded.config.routing.enabled) != (
                old_cfg.routing.socketmap, old_cfg.routing.enabled):
            warnings.append("routing.socketmap changed: takes effect at the next restart")
        for key in ("milter", "store", "state_dir", "control", "metrics", "logging"):
            if getattr(loaded.config, key) != getattr(old_cfg, key):
                warnings.append(f"{key} changed: takes effect at the next restart")
        with old.lock:
            old.retired = True
            idle = old.active == 0
        if idle:
            self._shutdown(old)
        msg = f"reloaded {self.config_path}: {len(new.chain.steps)} steps ({', '.join(s.name for s in new.chain.steps)})"
        for w in warnings:
            log.warning("reload: %s", w)
        return msg + "".join(f"; {w}" for w in warnings)

    def close(self) -> None:
        if self._started:
            self._shutdown(self._runtime)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=5)
            self._loop.close()
            self._loop = None
        if self._store is not None:
            self._store.close()
            self._store = None
        self._started = False

    # -- async bridge ------------------------------------------------------------
    def resolve(self, awaitables: list[Any], timeout: float | None = None) -> list[Any]:
        """Await ``awaitables`` on the app's event loop from a worker thread."""
        if self._loop is None:
            self.start()
        assert self._loop is not None
        if threading.current_thread() is self._loop_thread:
            raise RuntimeError("App.resolve called from the event loop thread")

        async def gather() -> list[Any]:
            return [await a for a in awaitables]

        fut = asyncio.run_coroutine_threadsafe(gather(), self._loop)
        try:
            return fut.result(timeout if timeout is not None else self._runtime.config.milter.chain_timeout)
        except TimeoutError:
            fut.cancel()
            raise

    # -- one transaction ----------------------------------------------------------------
    def acquire(self) -> Runtime:
        """The runtime a new transaction uses; pair with ``release``."""
        with self._runtime_lock:
            rt = self._runtime
            with rt.lock:
                rt.active += 1
        with self._idle:
            self._active += 1
        return rt

    def release(self, rt: Runtime) -> None:
        with rt.lock:
            rt.active -= 1
            done = rt.retired and rt.active == 0
        with self._idle:
            self._active -= 1
            self._idle.notify_all()
        if done:
            self._shutdown(rt)

    @property
    def in_flight(self) -> int:
        """Transactions between MAIL FROM and their end, over all runtimes."""
        return self._active

    def drain(self, timeout: float) -> int:
        """Stop taking new transactions; wait up to ``timeout`` s for the others to end.

        Returns how many were still in flight when the time ran out (their MTA
        connections then drop, and the MTA answers its clients 4xx).
        """
        self.draining = True
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._active > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
            return self._active

    def process(self, txn: Transaction, rt: Runtime) -> Outcome:
        """Run the chain; any internal error becomes a 451 outcome (fail closed)."""
        try:
            return rt.chain.run(txn, self, self.resolve)
        except StoreUnavailable as e:
            log.error("store unavailable: %s", e)
            return tempfail_outcome(f"store unavailable: {e}")
        except Exception as e:
            log.exception("internal error in the chain")
            return tempfail_outcome(f"internal error: {type(e).__name__}: {e}")

    def end(self, txn: Transaction, outcome: Outcome, rt: Runtime) -> None:
        """Count the transaction, tell the steps how it ended, then keep its events.

        The one place every transaction passes once (the milter front end and
        replay both call it), so the metrics are recorded here. Events are kept
        (and counted) when the outcome is final (accepted, discarded,
        quarantined, rejected); a tempfailed attempt will be retried, and its
        events would come twice.
        """
        try:
            self.metrics.transaction(outcome)
        except Exception:  # metrics never cost a message
            log.exception("metrics: recording the transaction failed")
        rt.chain.transaction_end(txn, outcome, self, self.resolve)
        if outcome.events and outcome.verdict != "tempfail":
            common = {"MessageID": txn.message.get_text("Message-ID"), "queue_id": txn.queue_id,
                      "customcampaign": txn.directives.campaign, "CustomID": txn.directives.custom_id,
                      "Payload": txn.directives.payload}
            try:
                self.store.add_events([{**common, **e.as_dict()} for e in outcome.events])
            except StoreUnavailable as e:
                log.error("events not kept, store unavailable: %s", e)

    def summarize(self, txn: Transaction, outcome: Outcome, elapsed_ms: float, note: str = "") -> None:
        """The one INFO line per transaction (no bodies, no credentials)."""
        steps = " ".join(f"{t.step}={t.action.split(':', 1)[0]}({t.ms:.1f}ms)" for t in outcome.trace)
        reply = f" reply={outcome.reply.code} {outcome.reply.status}" if outcome.reply else ""
        summary_log.info(
            "from=<%s> nrcpt=%d size=%d verdict=%s%s steps=[%s] time=%.1fms%s%s",
            escape(txn.envelope.sender), len(txn.envelope.recipients), txn.message.body.size,
            outcome.verdict, reply, steps, elapsed_ms,
            f" route={escape(outcome.route.target)}" if outcome.route else "",
            f" {escape(note)}" if note else "",
        )
