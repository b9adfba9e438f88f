"""Configuration: every error with file:line:col; secrets; defaults; plugin configs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mjfilter.app import prepare
from mjfilter.config import ConfigError, config_path, load_config

ROOT = Path(__file__).parent.parent


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as e:
        prepare(load_config(path))
    return [str(p).replace(str(path), "c.yaml") for p in e.value.problems]


def test_shipped_configuration_is_valid():
    rt = prepare(load_config(ROOT / "conf" / "mjfilter.yaml"))
    assert [s.plugin for s in rt.chain.steps] == ["headers", "suppression", "dedup", "route"]


def test_duplicate_key(tmp_path):
    assert problems(tmp_path, """\
        milter:
          listen: inet:127.0.0.1:8894
        store:
          timeout: 3
        milter:
          name: x
        """) == ["c.yaml:5:1: duplicate key 'milter' (first defined at line 1)"]


def test_unknown_key(tmp_path):
    assert problems(tmp_path, """\
        milter:
          listen: inet:127.0.0.1:8894
          lisen: inet:127.0.0.1:1
        """) == ["c.yaml:3:3: unknown key 'lisen' in milter"]


def test_yaml_syntax_error(tmp_path):
    [p] = problems(tmp_path, """\
        milter:
          listen: [inet:127.0.0.1:8894
        chain: []
        """)
    assert p.startswith("c.yaml:3:") and "YAML syntax error" in p


def test_wrong_type(tmp_path):
    [p] = problems(tmp_path, """\
        reinject:
          port: lots
        """)
    assert p.startswith("c.yaml:2:9: reinject.port:") and "integer" in p


def test_bad_listen(tmp_path):
    [p] = problems(tmp_path, "milter:\n  listen: tcp:8894\n")
    assert p.startswith("c.yaml:2:11: milter.listen:") and "inet:HOST:PORT" in p


def test_unknown_plugin(tmp_path):
    [p] = problems(tmp_path, """\
        chain:
          - use: headers
          - use: no-such-plugin
        """)
    assert p.startswith("c.yaml:3:10: unknown plugin 'no-such-plugin'") and "headers" in p


def test_plugin_that_fails_to_import_is_named_with_its_distribution(tmp_path):
    [p] = problems(tmp_path, "chain:\n  - use: test-broken\n")
    assert p.startswith("c.yaml:2:10: plugin 'test-broken'")
    assert "mjfilter-testplugins" in p and "broken on purpose" in p


def test_plugin_config_errors_are_located(tmp_path):
    assert problems(tmp_path, """\
        chain:
          - use: headers
            config:
              extra: ["X-A"]
              kep: ["X-B"]
        """) == ["c.yaml:5:7: unknown key 'kep' in chain.0.config"]


def test_plugin_without_model_takes_no_config(tmp_path):
    [p] = problems(tmp_path, "chain:\n  - use: test-copies\n    config: {a: 1}\n")
    assert p == "c.yaml:3:5: plugin 'test-copies' takes no config"


def test_step_names_must_be_unique(tmp_path):
    [p] = problems(tmp_path, "chain:\n  - use: headers\n  - use: headers\n")
    assert "two chain steps are named 'headers'" in p


def test_bad_when_rule(tmp_path):
    [p] = problems(tmp_path, "chain:\n  - use: headers\n    when:\n      client: [not-a-net]\n")
    assert p.startswith("c.yaml:4:15: chain.0.when.client:")


def test_secrets_from_env_and_file(tmp_path, monkeypatch):
    (tmp_path / "secret.txt").write_text("from-file\n")
    monkeypatch.setenv("MJ_TEST_SECRET", "from-env")
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""\
        chain:
          - use: example-stamp
            name: a
            config: {value: {$env: MJ_TEST_SECRET}}
          - use: example-stamp
            name: b
            config: {value: {$file: secret.txt}}
        """))
    rt = prepare(load_config(path))
    assert [s.config.value for s in rt.chain.steps] == ["from-env", "from-file"]
    monkeypatch.delenv("MJ_TEST_SECRET")
    with pytest.raises(ConfigError, match=r":4:21: environment variable MJ_TEST_SECRET is not set"):
        load_config(path)


def test_relative_state_dir_and_default_store(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("state_dir: st\n")
    cfg = load_config(path).config
    assert cfg.state_dir == tmp_path.resolve() / "st"
    assert cfg.store_url == f"sqlite:///{tmp_path.resolve() / 'st' / 'mjfilter.db'}"
    assert cfg.control_socket == tmp_path.resolve() / "st" / "control.sock"


def test_config_path_from_environment(monkeypatch):
    monkeypatch.setenv("MJFILTER_CONFIG", "/x/y.yaml")
    assert config_path(None) == Path("/x/y.yaml")
    assert config_path("a.yaml") == Path("a.yaml")
