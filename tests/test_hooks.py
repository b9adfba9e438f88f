"""One test per hook (tests/test_docs.py checks that every hook has one here)."""

from __future__ import annotations

import pytest

from conftest import eml
from mjfilter.actions import ActionError
from mjfilter.app import App, prepare
from mjfilter.config import ConfigError, load_config
from mjfilter.frontends.replay import replay


def test_hook_mjfilter_config_model(write_config):
    rt = prepare(load_config(write_config([{"use": "example-stamp", "config": {"value": "v1", "header": "X-S"}}])))
    assert type(rt.chain.steps[0].config).__name__ == "Config" and rt.chain.steps[0].config.value == "v1"
    with pytest.raises(ConfigError, match=r"chain\.0\.config\.header"):
        prepare(load_config(write_config([{"use": "example-stamp", "config": {"header": "Bad Name:"}}])))


def test_hook_mjfilter_capabilities(make_app):
    app = make_app([{"use": "example-stamp"}, {"use": "headers"}])
    assert [s.capabilities for s in app.runtime.chain.steps] == [frozenset({"add_header"}),
                                                                 frozenset({"change_header"})]
    assert app.runtime.chain.capabilities == {"add_header", "change_header"}
    r = replay(make_app([{"use": "test-verdict", "config": {"verdict": "reject"}}]), eml("plain.eml"),
               "a@b.example", ["c@d.example"])
    assert r.outcome.verdict == "reject"  # no capability needed for a verdict
    with pytest.raises(ActionError):
        from mjfilter.actions import Actions
        from mjfilter.frontends.replay import make_transaction

        a = Actions(make_transaction(eml("plain.eml"), "a@b.example", ["c@d.example"]))
        a.step, a.allowed = "stamp", frozenset({"add_header"})
        a.delete_header("Subject")


def test_hook_mjfilter_startup(write_config):
    app = App(load_config(write_config([{"use": "example-stamp"}])))
    cfg = app.runtime.chain.steps[0].config
    assert cfg._started is False
    app.start()
    try:
        assert cfg._started is True
    finally:
        app.close()


def test_hook_mjfilter_message(make_app):
    app = make_app([{"use": "example-stamp", "config": {"value": "hello", "with_campaign": True}}])
    r = replay(app, eml("all-vendors.eml"), "a@b.example", ["c@d.example"])
    assert r.txn.message.get("X-Stamp") == b"hello; campaign=spring_sale-2026"
    assert r.txn.message.headers[-1][0] == "X-Stamp"


def test_hook_mjfilter_transaction_end(make_app):
    app = make_app([{"use": "example-stamp"}, {"use": "test-verdict", "config": {"verdict": "tempfail"}}])
    replay(app, eml("plain.eml"), "a@b.example", ["c@d.example"])
    assert app.runtime.chain.steps[0].config._ended == ["tempfail"]


def test_hook_mjfilter_shutdown(write_config):
    path = write_config([{"use": "example-stamp"}])
    app = App(load_config(path))
    app.start()
    first = app.runtime.chain.steps[0].config
    rt = app.acquire()  # a transaction in flight keeps the old chain alive
    app.reload()
    assert app.runtime.generation == 1 and first._stopped is False
    app.release(rt)
    assert first._stopped is True  # shut down once its last transaction ended
    second = app.runtime.chain.steps[0].config
    app.close()
    assert second._stopped is True
