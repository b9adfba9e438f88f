"""The chain: configured plugin steps run in YAML order on one transaction.

Each step may be gated by a ``when:`` rule; a terminal verdict stops the chain;
an exception in a step answers 451 (``on_error: tempfail``) or undoes that
step's edits and goes on (``on_error: skip``). Every step is timed and traced.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

from pydantic import BaseModel, ValidationError

from .actions import CAPABILITIES, TEMPFAIL_REPLY, Actions, Delivery, Edit, Event, Reply, Route, Verdict
from .config import ConfigError, ConfigProblem, LoadedConfig, Rule
from .dialects import parse_directives
from .model import Transaction
from .plugins import Hooks, pending_awaitables
from .store import StoreUnavailable

log = logging.getLogger(__name__)

Resolver = Callable[..., Any]  # App.resolve: await a list of awaitables


@dataclass(slots=True)
class Step:
    name: str
    plugin: str
    rule: Rule | None
    on_error: str
    config: Any
    capabilities: frozenset[str]


@dataclass(frozen=True, slots=True)
class TraceEntry:
    step: str
    action: str
    ms: float

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "action": self.action, "ms": round(self.ms, 3)}


@dataclass(slots=True)
class Outcome:
    """Everything the chain decided for one transaction, for the front end to apply."""

    verdict: Verdict
    reply: Reply | None = None
    edits: list[Edit] = field(default_factory=list)
    route: Route | None = None
    deliveries: list[Delivery] = field(default_factory=list)  # extra copies
    events: list[Event] = field(default_factory=list)
    trace: list[TraceEntry] = field(default_factory=list)
    quarantine_reason: str | None = None
    steps_run: list[Step] = field(default_factory=list)
    error: str | None = None  # internal error text, for logs only (never sent to the client)

    @property
    def ms(self) -> float:
        return sum(t.ms for t in self.trace)

    def all_deliveries(self, txn: Transaction) -> list[Delivery]:
        """The live transaction's copy (if it is delivered) followed by the extra copies."""
        out = []
        if self.verdict in ("accept", "quarantine") and txn.envelope.recipients:
            out.append(Delivery(txn.envelope.sender, list(txn.envelope.recipients), txn.message))
        return out + list(self.deliveries)

    def as_dict(self, txn: Transaction) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reply": self.reply.as_dict() if self.reply else None,
            "route": self.route.as_dict() if self.route else None,
            "deliveries": [d.as_dict() for d in self.all_deliveries(txn)],
            "events": [e.as_dict() for e in self.events],
            "trace": [t.as_dict() for t in self.trace],
            "directives": txn.directives.as_dict(),
            "queue_id": txn.queue_id,
        }


def tempfail_outcome(error: str, trace: list[TraceEntry] | None = None) -> Outcome:
    return Outcome("tempfail", TEMPFAIL_REPLY, trace=trace or [], error=error)


def _describe(actions: Actions, edits_before: int, notes_before: int) -> str:
    parts: list[str] = []
    counts: dict[str, int] = {}
    for e in actions.edits[edits_before:]:
        kind = type(e).__name__
        if kind == "ChangeHeader" and e.value is None:  # type: ignore[union-attr]
            kind = "DeleteHeader"
        counts[kind] = counts.get(kind, 0) + 1
    parts.extend(f"{k} x{n}" if n > 1 else k for k, n in counts.items())
    if actions.verdict_step == actions.step and actions.final:
        r = actions.reply
        parts.append(f"{actions.verdict} {r.code} {r.status}" if r else actions.verdict)
    parts.extend(n.split(": ", 1)[-1] for n in actions.notes[notes_before:])
    return "ok" + (": " + ", ".join(parts) if parts else "")


class Chain:
    """An immutable, ready-to-run list of steps (one per YAML ``chain`` entry)."""

    def __init__(self, steps: list[Step], hooks: Hooks) -> None:
        self.steps = steps
        self.hooks = hooks
        caps: set[str] = set()
        for s in steps:
            caps |= s.capabilities
        self.capabilities = frozenset(caps)

    def run(self, txn: Transaction, app: Any, resolve: Resolver) -> Outcome:
        """Run every step on ``txn``; never raises for a step's failure."""
        txn.directives = parse_directives(txn.message.headers)
        actions = Actions(txn)
        trace: list[TraceEntry] = []
        ran: list[Step] = []
        for step in self.steps:
            if actions.final:
                break
            t0 = time.perf_counter()
            if step.rule is not None and not step.rule.matches(txn):
                trace.append(TraceEntry(step.name, "skipped: when does not match", (time.perf_counter() - t0) * 1e3))
                continue
            actions.step, actions.allowed = step.name, step.capabilities
            snapshot = _Snapshot.take(txn, actions)
            ran.append(step)
            try:
                results = self.hooks.message(step.plugin, txn, actions, step.config, app)
                pending = pending_awaitables(results)
                if pending:
                    resolve(pending)
            except StoreUnavailable as e:
                # never a silent skip: whatever on_error says, the client retries later
                ms = (time.perf_counter() - t0) * 1e3
                log.error("step %s: store unavailable: %s", step.name, e)
                trace.append(TraceEntry(step.name, "error: store unavailable: tempfail", ms))
                out = tempfail_outcome(f"step {step.name}: store unavailable: {e}", trace)
                out.steps_run = ran
                return out
            except Exception as e:
                ms = (time.perf_counter() - t0) * 1e3
                if step.on_error == "skip":
                    snapshot.restore(txn, actions)
                    log.warning("step %s failed and was skipped (on_error: skip): %s: %s",
                                step.name, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
                    trace.append(TraceEntry(step.name, f"error skipped: {type(e).__name__}", ms))
                    continue
                log.error("step %s failed: %s: %s", step.name, type(e).__name__, e, exc_info=True)
                trace.append(TraceEntry(step.name, f"error: {type(e).__name__}: tempfail", ms))
                out = tempfail_outcome(f"step {step.name}: {type(e).__name__}: {e}", trace)
                out.steps_run = ran
                return out
            trace.append(TraceEntry(step.name, _describe(actions, snapshot.edits, snapshot.notes),
                                    (time.perf_counter() - t0) * 1e3))
        actions.step, actions.allowed = "", None
        if actions.verdict == "accept" and not txn.envelope.recipients:
            # every recipient was removed: the live copy goes nowhere (extra copies still do)
            actions.verdict = "discard"
            trace.append(TraceEntry("(chain)", "discard: no recipient left", 0.0))
        return Outcome(
            verdict=actions.verdict,
            reply=actions.reply,
            edits=actions.edits,
            route=actions.route,
            deliveries=actions.deliveries,
            events=actions.events,
            trace=trace,
            quarantine_reason=actions.quarantine_reason,
            steps_run=ran,
        )

    def transaction_end(self, txn: Transaction, outcome: Outcome, app: Any, resolve: Resolver) -> None:
        """Tell every step that ran how the transaction ended; errors are only logged."""
        for step in outcome.steps_run:
            try:
                pending = pending_awaitables(self.hooks.transaction_end(step.plugin, txn, outcome, step.config, app))
                if pending:
                    resolve(pending)
            except Exception:
                log.exception("step %s: mjfilter_transaction_end failed", step.name)


@dataclass(slots=True)
class _Snapshot:
    """What one step may change, taken before it runs (``on_error: skip`` puts it back)."""

    headers: list[tuple[str, bytes]]
    body: Any
    sender: str
    recipients: list[str]
    edits: int
    deliveries: int
    events: int
    notes: int
    route: Route | None
    verdict: Verdict
    reply: Reply | None
    quarantine_reason: str | None
    verdict_step: str | None

    @classmethod
    def take(cls, txn: Transaction, a: Actions) -> "_Snapshot":
        env = txn.envelope
        return cls(list(txn.message.headers), txn.message.body, env.sender, list(env.recipients),
                   len(a.edits), len(a.deliveries), len(a.events), len(a.notes), a.route,
                   a.verdict, a.reply, a.quarantine_reason, a.verdict_step)

    def restore(self, txn: Transaction, a: Actions) -> None:
        txn.message.headers[:] = self.headers
        txn.message.body = self.body
        txn.envelope.sender = self.sender
        txn.envelope.recipients[:] = self.recipients
        del a.edits[self.edits:], a.deliveries[self.deliveries:], a.events[self.events:], a.notes[self.notes:]
        a.route, a.verdict, a.reply = self.route, self.verdict, self.reply
        a.quarantine_reason, a.verdict_step = self.quarantine_reason, self.verdict_step


def build_steps(loaded: LoadedConfig, hooks: Hooks) -> list[Step]:
    """Validate every step's ``config`` with its plugin's model; raise ``ConfigError``."""
    problems: list[ConfigProblem] = []
    steps: list[Step] = []
    for i, sc in enumerate(loaded.config.chain):
        where = ("chain", i, "config")
        model = hooks.config_model(sc.use)
        config: Any = None
        if model is None:
            if sc.config:
                problems.append(loaded.locate(where, f"plugin {sc.use!r} takes no config", key=True))
                continue
        else:
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                problems.append(loaded.locate(("chain", i, "use"),
                                              f"plugin {sc.use!r}: mjfilter_config_model must return a pydantic model"))
                continue
            try:
                config = model.model_validate(sc.config or {})
            except ValidationError as e:
                problems.extend(loaded.validation_problems(e, where))
                continue
        caps = hooks.capabilities(sc.use, config)
        unknown = caps - CAPABILITIES
        if unknown:
            problems.append(loaded.locate(("chain", i, "use"),
                                          f"plugin {sc.use!r} declares unknown capabilities: {sorted(unknown)}"))
            continue
        rule = sc.when.compile() if sc.when is not None else None
        steps.append(Step(sc.step_name, sc.use, rule, sc.on_error, config, caps))
    if problems:
        raise ConfigError(problems)
    return steps
