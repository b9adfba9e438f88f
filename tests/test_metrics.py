"""Prometheus metrics, counted through the replay path and the milter front end, read from each app's registry."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from conftest import eml
from mjfilter.actions import Event
from mjfilter.chain import Outcome, TraceEntry
from mjfilter.config import ConfigError, load_config
from mjfilter.frontends.replay import replay
from mjfilter.metrics import MAX_EVENT_SERIES, OTHER, InstrumentedStore, Metrics
from mjfilter.store import StoreUnavailable

SENDER = "app@shop.example"


def sample(app_or_metrics, name: str, **labels: str) -> float:
    metrics = getattr(app_or_metrics, "metrics", app_or_metrics)
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def dedup_msg(mid: str) -> bytes:
    return (f"From: app@shop.example\r\nTo: someone@example.org\r\nSubject: offer\r\n"
            f"Message-ID: <{mid}@shop.example>\r\nX-Mailjet-Campaign: spring-secret-campaign\r\n"
            f"X-Mailjet-DeduplicateCampaign: yes\r\n\r\nHello.\r\n").encode()


def test_messages_by_verdict_and_step_times(make_app):
    app = make_app([{"use": "headers", "name": "strip"}, {"use": "example-stamp"}])
    assert sample(app, "mjfilter_messages_total", verdict="accept") == 0  # every verdict shows from the start
    assert sample(app, "mjfilter_messages_total", verdict="reject") == 0
    for _ in range(3):
        assert replay(app, eml("plain.eml"), SENDER, ["bob@example.org"]).outcome.verdict == "accept"
    assert sample(app, "mjfilter_messages_total", verdict="accept") == 3
    for step in ("strip", "example-stamp"):
        assert sample(app, "mjfilter_step_seconds_count", step=step) == 3
        assert sample(app, "mjfilter_step_seconds_bucket", step=step, le="+Inf") == 3
        assert 0 < sample(app, "mjfilter_step_seconds_sum", step=step) < 3


def test_each_app_has_its_own_registry(make_app):
    a, b = make_app([{"use": "headers"}]), make_app([{"use": "headers"}])
    replay(a, eml("plain.eml"), SENDER, ["bob@example.org"])
    assert sample(a, "mjfilter_messages_total", verdict="accept") == 1
    assert sample(b, "mjfilter_messages_total", verdict="accept") == 0
    assert a.metrics.registry is not b.metrics.registry


def test_steps_skipped_by_their_when_rule_are_not_observed(make_app):
    app = make_app([{"use": "headers"}, {"use": "example-stamp", "when": {"sender": "nobody@*"}}])
    replay(app, eml("plain.eml"), SENDER, ["bob@example.org"])
    assert sample(app, "mjfilter_step_seconds_count", step="headers") == 1
    assert sample(app, "mjfilter_step_seconds_count", step="example-stamp") == 0


def test_tempfail_is_counted_and_its_step_observed(make_app):
    app = make_app([{"use": "headers"}, {"use": "test-raise", "config": {"message": "boom"}}])
    assert replay(app, eml("plain.eml"), SENDER, ["bob@example.org"]).outcome.verdict == "tempfail"
    assert sample(app, "mjfilter_messages_total", verdict="tempfail") == 1
    assert sample(app, "mjfilter_messages_total", verdict="accept") == 0
    assert sample(app, "mjfilter_step_seconds_count", step="test-raise") == 1


def test_dedup_blocks_show_as_events_and_store_calls_are_timed(make_app):
    app = make_app([{"use": "headers"}, {"use": "dedup"}])
    assert replay(app, dedup_msg("m1"), SENDER, ["bob@example.org"]).outcome.verdict == "accept"
    assert replay(app, dedup_msg("m2"), SENDER, ["bob@example.org"]).outcome.verdict == "discard"
    assert sample(app, "mjfilter_events_total", event="blocked", error="duplicate in campaign") == 1
    assert sample(app, "mjfilter_messages_total", verdict="discard") == 1
    assert sample(app, "mjfilter_store_seconds_count", op="reserve") == 2
    assert sample(app, "mjfilter_store_seconds_count", op="add_events") == 1
    assert sample(app, "mjfilter_store_errors_total", op="reserve") == 0
    text = generate_latest(app.metrics.registry).decode()
    # no address, campaign or header value in any label
    assert "@" not in text and "spring" not in text and "bob" not in text


def test_events_of_a_tempfailed_attempt_are_not_counted():
    m = Metrics(process=False)
    events = [Event("blocked", "bob@example.org", data={"error": "duplicate in campaign"})]
    m.transaction(Outcome("tempfail", events=list(events)))
    assert sample(m, "mjfilter_events_total", event="blocked", error="duplicate in campaign") == 0
    m.transaction(Outcome("accept", events=list(events)))
    assert sample(m, "mjfilter_events_total", event="blocked", error="duplicate in campaign") == 1


def test_event_label_sets_are_capped():
    m = Metrics(process=False)
    for i in range(MAX_EVENT_SERIES + 10):
        m.transaction(Outcome("accept", events=[Event("blocked", None, data={"error": f"e{i}"})]))
    assert sample(m, "mjfilter_events_total", event=OTHER, error=OTHER) == 10
    series = [s for f in m.registry.collect() if f.name == "mjfilter_events" for s in f.samples
              if s.name == "mjfilter_events_total"]
    assert len(series) == MAX_EVENT_SERIES + 1


def test_trace_notes_are_not_steps():
    m = Metrics(process=False)
    m.transaction(Outcome("discard", trace=[TraceEntry("s", "ok", 2.0), TraceEntry("(chain)", "discard: x", 0.0)]))
    assert sample(m, "mjfilter_step_seconds_count", step="s") == 1
    assert sample(m, "mjfilter_step_seconds_sum", step="s") == pytest.approx(0.002)
    assert sample(m, "mjfilter_step_seconds_count", step="(chain)") == 0


def test_store_errors_are_counted_and_the_message_tempfails(make_app):
    app = make_app([{"use": "headers"}, {"use": "suppression"}],
                   store={"url": "redis://127.0.0.1:1/0", "timeout": 0.5})
    assert replay(app, eml("plain.eml"), SENDER, ["bob@example.org"]).outcome.verdict == "tempfail"
    assert sample(app, "mjfilter_store_errors_total", op="suppressed") == 1
    assert sample(app, "mjfilter_store_seconds_count", op="suppressed") == 1
    assert sample(app, "mjfilter_messages_total", verdict="tempfail") == 1


def test_store_proxy_forwards_the_contract(make_app):
    app = make_app([])
    store = app.store
    assert isinstance(store, InstrumentedStore)
    assert store.url == store.inner.url and store.url.startswith("sqlite:///")
    assert store.put_if_absent("k", "v1") == "v1" and store.put_if_absent("k", "v2") == "v1"
    assert store.get("k") == "v1"
    assert store.reserve(["a", "b"], "h1") == [1, 1] and store.holder("a") == "h1"
    assert store.release(["a", "b"], "h1") == 2
    assert store.check()["ok"] is True
    assert sample(app, "mjfilter_store_seconds_count", op="put_if_absent") == 2
    assert app.metrics.instrument(store) is store  # never wrapped twice


def test_store_proxy_counts_any_failure():
    class Down:
        url = "redis://127.0.0.1:1/0"

        def ping(self) -> None:
            raise StoreUnavailable("down")

    m = Metrics(process=False)
    store = InstrumentedStore(Down(), m)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable):
        store.ping()
    assert sample(m, "mjfilter_store_errors_total", op="ping") == 1
    assert sample(m, "mjfilter_store_seconds_count", op="ping") == 1


def test_reinjection_failures_are_counted(make_app):
    from rig import free_port
    from test_milter import Client

    app = make_app([{"use": "test-copies"}], reinject={"host": "127.0.0.1", "port": free_port(), "timeout": 2})
    Client(app).send(eml("plain.eml"), "a@b.example", ["one@example.org", "two@example.org"])
    assert sample(app, "mjfilter_reinject_failures_total") == 1
    assert sample(app, "mjfilter_messages_total", verdict="tempfail") == 1


def test_milter_front_end_counts_every_message_once(make_app):
    from test_milter import Client

    app = make_app([{"use": "headers"}])
    c = Client(app)
    for i in range(4):
        c.send(eml("plain.eml"), "a@b.example", [f"r{i}@example.org"])
    assert sample(app, "mjfilter_messages_total", verdict="accept") == 4
    assert sample(app, "mjfilter_step_seconds_count", step="headers") == 4


def test_in_flight_generation_and_build_info(make_app, write_config):
    from mjfilter import __version__

    app = make_app([{"use": "headers"}])
    assert sample(app, "mjfilter_transactions_in_flight") == 0
    rt = app.acquire()
    assert sample(app, "mjfilter_transactions_in_flight") == 1
    app.release(rt)
    assert sample(app, "mjfilter_transactions_in_flight") == 0
    assert sample(app, "mjfilter_config_generation") == 0
    app.reload()
    assert sample(app, "mjfilter_config_generation") == 1
    assert sample(app, "mjfilter_build_info", version=__version__) == 1


def test_process_metrics_are_there(make_app):
    app = make_app([])
    assert sample(app, "process_resident_memory_bytes") > 0


@pytest.mark.parametrize("listen, ok", [
    ("127.0.0.1:9894", True), ("[::1]:9894", True), ("0.0.0.0:9894", True), ("localhost:9894", True),
    ("9894", False), ("127.0.0.1", False), ("127.0.0.1:0", False), ("127.0.0.1:70000", False),
    ("::1:9894", False), (":9894", False), ("[::1]9894", False),
])
def test_metrics_listen_is_validated(write_config, listen, ok):
    path = write_config([], metrics={"listen": listen})
    if ok:
        assert load_config(path).config.metrics.listen == listen
    else:
        with pytest.raises(ConfigError, match=r"mjfilter.yaml:\d+:\d+: metrics.listen: "):
            load_config(path)


def test_metrics_are_off_by_default_and_unknown_keys_are_refused(write_config):
    assert load_config(write_config([])).config.metrics.address is None
    assert load_config(write_config([], metrics={"listen": None})).config.metrics.address is None
    with pytest.raises(ConfigError, match="unknown key 'port' in metrics"):
        load_config(write_config([], metrics={"port": 9894}))
