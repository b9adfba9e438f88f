"""`mjfilter suppress|campaigns|store check|events`, run as a user runs them (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mjfilter.app import App
from mjfilter.config import load_config
from mjfilter.frontends.replay import replay

MJ = [sys.executable, "-m", "mjfilter"]

CSV = """\
# unsubscribed through the old system
Entry,Code,Reason
bob@Example.org,550,unsubscribed 2026-01-02

example.net,,whole domain
"carol@example.org",553,"said ""stop"", twice"
dave@example.org
"""


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(MJ + list(args), check=False, capture_output=True, text=True, input=input, timeout=60)


@pytest.fixture
def conf(write_config) -> str:
    return str(write_config([{"use": "headers"}, {"use": "dedup"}, {"use": "suppression"}]))


def msg(mid: str) -> bytes:
    return (f"From: a@shop.example\r\nSubject: s\r\nMessage-ID: <{mid}@shop.example>\r\n"
            "X-Mailjet-Campaign: spring\r\nX-Mailjet-DeduplicateCampaign: 1\r\n\r\nHi.\r\n").encode()


def replay_some(conf: str) -> None:
    app = App(load_config(conf))
    app.start()
    try:
        replay(app, msg("m1"), "a@shop.example", ["bob@example.org", "eve@example.org"], auth_user="alice")
        replay(app, msg("m2"), "a@shop.example", ["bob@example.org"], auth_user="alice")
    finally:
        app.close()


@pytest.mark.parametrize("cmd", [["suppress"], ["suppress", "add"], ["suppress", "remove"], ["suppress", "list"],
                                 ["suppress", "import"], ["suppress", "export"], ["campaigns"], ["store"],
                                 ["store", "check"], ["events"]])
def test_every_command_has_help(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0 and "usage: mjfilter" in r.stdout and "example" in r.stdout, r.stderr
    assert len(r.stdout) > 300


def test_add_list_remove(conf):
    r = run("suppress", "add", "unsubscribe", "Bob@Example.org", "--code", "553", "--reason", "asked", "-c", conf)
    assert r.returncode == 0 and "bob@example.org" in r.stdout, r.stderr
    assert run("suppress", "add", "bounce", "gone.example", "-c", conf).returncode == 0
    r = run("suppress", "list", "--json", "-c", conf)
    entries = json.loads(r.stdout)
    assert [(e["list"], e["entry"], e["code"], e["reason"]) for e in entries] == [
        ("bounce", "@gone.example", None, None), ("unsubscribe", "bob@example.org", 553, "asked")]
    assert entries[0]["added"].endswith("Z")
    r = run("suppress", "list", "unsubscribe", "-c", conf)
    assert r.returncode == 0 and "bob@example.org" in r.stdout and "gone.example" not in r.stdout
    assert r.stdout.splitlines()[0].split() == ["LIST", "ENTRY", "CODE", "REASON", "ADDED"]
    r = run("suppress", "remove", "unsubscribe", "BOB@example.org", "-c", conf)
    assert r.returncode == 0, r.stderr
    r = run("suppress", "remove", "unsubscribe", "bob@example.org", "-c", conf)
    assert r.returncode == 1 and "not on the unsubscribe list" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["suppress", "add", "unsubscribe", "a b@example.org"], "not an address or a domain"),
    (["suppress", "add", "unsubscribe", "a@example.org", "--code", "250"], "not a 4xx or 5xx"),
    (["suppress", "add", "junk", "a@example.org"], "invalid choice"),
    (["suppress", "add", "bounce", "a@example.org", "--reason", "two\nlines"], "one line"),
    (["events", "--limit", "0"], "1 or more"),
])
def test_usage_errors_exit_2(conf, args, message):
    r = run(*args, "-c", conf)
    assert r.returncode == 2 and message in r.stderr


def test_import_export_round_trip(conf, tmp_path, write_config):
    src = tmp_path / "in.csv"
    src.write_text(CSV)
    r = run("suppress", "import", "unsubscribe", str(src), "-c", conf)
    assert r.returncode == 0 and "imported 4 entries into unsubscribe" in r.stdout, r.stderr
    run("suppress", "add", "bounce", "gone@example.net", "--code", "550", "-c", conf)
    r = run("suppress", "export", "-c", conf)
    assert r.returncode == 0
    assert r.stdout == (
        "list,entry,code,reason\n"
        "bounce,gone@example.net,550,\n"
        "unsubscribe,@example.net,,whole domain\n"
        "unsubscribe,bob@example.org,550,unsubscribed 2026-01-02\n"
        'unsubscribe,carol@example.org,553,"said ""stop"", twice"\n'
        "unsubscribe,dave@example.org,,\n")
    out = tmp_path / "out.csv"
    r = run("suppress", "export", "unsubscribe", "--output", str(out), "-c", conf)
    assert r.returncode == 0 and out.read_text().count("\n") == 5
    # an exported file imports as it is, into another store; rows of another list are skipped
    other = str(write_config([], name="other.yaml", state_dir=str(tmp_path / "other-state")))
    full = tmp_path / "full.csv"
    run("suppress", "export", "--output", str(full), "-c", conf)
    r = run("suppress", "import", "unsubscribe", str(full), "-c", other)
    assert r.returncode == 0 and "imported 4 entries" in r.stdout and "skipped 1" in r.stdout, r.stderr
    r = run("suppress", "import", "bounce", "-", "-c", other, input=full.read_text())
    assert r.returncode == 0 and "imported 1 entry into bounce" in r.stdout, r.stderr
    assert run("suppress", "export", "-c", other).stdout == run("suppress", "export", "-c", conf).stdout


def test_a_bad_row_imports_nothing(conf, tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text("entry,code\nok@example.org,550\n\n# comment\nbad address@example.org,550\nx@example.org,250\n"
                   "y@example.org,550,r,extra\n")
    r = run("suppress", "import", "bounce", str(src), "-c", conf)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert lines[0].startswith(f"{src}:5: ") and "not an address or a domain" in lines[0]
    assert lines[1].startswith(f"{src}:6: ") and "250 is not a 4xx or 5xx" in lines[1]
    assert lines[2].startswith(f"{src}:7: ") and "4 columns" in lines[2]
    assert "nothing imported" in lines[-1]
    assert json.loads(run("suppress", "list", "--json", "-c", conf).stdout) == []


def test_import_of_a_missing_file(conf, tmp_path):
    r = run("suppress", "import", "bounce", str(tmp_path / "nope.csv"), "-c", conf)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_campaigns_after_a_replay(conf):
    replay_some(conf)
    r = run("campaigns", "--json", "-c", conf)
    assert r.returncode == 0, r.stderr
    [c] = json.loads(r.stdout)
    assert {k: c[k] for k in ("tenant", "campaign", "messages", "delivered", "blocked")} == {
        "tenant": "alice", "campaign": "spring", "messages": 2, "delivered": 2, "blocked": 1}
    assert c["first_seen"].endswith("Z") and c["last_seen"] >= c["first_seen"]
    r = run("campaigns", "-c", conf)
    header, row = r.stdout.splitlines()
    assert header.split() == ["TENANT", "CAMPAIGN", "MESSAGES", "DELIVERED", "BLOCKED", "FIRST", "SEEN", "LAST",
                              "SEEN"]
    assert row.split()[:5] == ["alice", "spring", "2", "2", "1"]


def test_no_campaigns_yet(conf):
    r = run("campaigns", "-c", conf)
    assert r.returncode == 0 and "no campaigns" in r.stdout


def test_events(conf):
    replay_some(conf)
    r = run("events", "--json", "-c", conf)
    assert r.returncode == 0, r.stderr
    [ev] = [json.loads(line) for line in r.stdout.splitlines()]
    assert ev["event"] == "blocked" and ev["email"] == "bob@example.org" and ev["error"] == "duplicate in campaign"
    assert ev["MessageID"] == "<m2@shop.example>" and ev["customcampaign"] == "spring"
    r = run("events", "--limit", "5", "-c", conf)
    [line] = r.stdout.splitlines()
    assert line.split()[1:3] == ["blocked", "bob@example.org"] and 'error="duplicate in campaign"' in line


def test_store_check(conf):
    r = run("store", "check", "--json", "-c", conf)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True
    r = run("store", "check", "-c", conf)
    assert r.returncode == 0 and "ok: True" in r.stdout


def test_store_down_exits_1_without_the_password(write_config):
    conf = str(write_config([], store={"url": "redis://:s3cret@127.0.0.1:1/0", "timeout": 0.5}))
    for args in (["store", "check"], ["campaigns"], ["events"], ["suppress", "list"]):
        r = run(*args, "-c", conf)
        assert r.returncode == 1 and "store unavailable" in r.stderr, (args, r.stderr)
        assert "s3cret" not in r.stderr + r.stdout


def test_configuration_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("store:\n  url: mysql://x\n")
    for args in (["store", "check"], ["suppress", "list"], ["events"]):
        r = run(*args, "-c", str(bad))
        assert r.returncode == 2 and r.stderr.startswith(f"{bad}:2:8: ")


def test_relative_sqlite_path_is_taken_from_the_config_directory(tmp_path):
    conf = tmp_path / "rel.yaml"
    conf.write_text(f"state_dir: {tmp_path / 'state'}\nstore:\n  url: sqlite:///db/rel.db\n")
    assert run("suppress", "add", "bounce", "a@example.org", "-c", str(conf)).returncode == 0
    assert Path(tmp_path / "db" / "rel.db").exists()
