"""The `mjfilter` command, run as a user runs it (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DATA, ROOT

MJ = [sys.executable, "-m", "mjfilter"]
CONF = str(ROOT / "conf" / "mjfilter.yaml")


def run(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(MJ + list(args), capture_output=True, text=input is None, input=input, timeout=60)


@pytest.mark.parametrize("cmd", [[], ["run"], ["check"], ["config"], ["config", "check"], ["plugins"],
                                 ["postfix-config"], ["reload"], ["status"], ["suppress"],
                                 ["suppress", "add"], ["suppress", "import"], ["suppress", "export"],
                                 ["campaigns"], ["store"], ["store", "check"], ["events"]])
def test_every_command_has_help(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0 and "usage: mjfilter" in r.stdout and len(r.stdout) > 200


def test_check_json_on_the_all_vendors_message():
    r = run("check", "-c", CONF, "--sender", "app@shop.example", "--rcpt", "bob@example.org",
            str(DATA / "all-vendors.eml"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"verdict", "reply", "route", "deliveries", "events", "trace"}
    assert out["verdict"] == "accept" and out["reply"] is None and out["route"] is None
    [d] = out["deliveries"]
    assert d["sender"] == "app@shop.example" and d["recipients"] == ["bob@example.org"]
    head = d["message"].split("\r\n\r\n", 1)[0].lower()
    for prefix in ("x-mailjet-", "x-mj-", "x-mq-", "x-smtpeter-", "x-mxm-", "x-mjfilter-"):
        assert prefix not in head
    assert "s3cr3t" not in r.stdout
    assert out["trace"][0]["step"] == "strip-control-headers" and set(out["trace"][0]) == {"step", "action", "ms"}


def test_check_human_output_and_stdin():
    data = (DATA / "plain.eml").read_bytes()
    r = subprocess.run(MJ + ["check", "-c", CONF, "--sender", "a@b.example", "--rcpt", "c@d.example", "-"],
                       input=data, capture_output=True, timeout=60)
    out = r.stdout.decode()
    assert r.returncode == 0 and "trace:" in out and "verdict: accept" in out and "Subject: plain" in out


def test_config_check_ok_and_error(tmp_path):
    r = run("config", "check", "-c", CONF)
    assert r.returncode == 0 and "OK" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("milter:\n  listen: inet:127.0.0.1:1\nmilter: {}\n")
    r = run("config", "check", "-c", str(bad))
    assert r.returncode == 2 and r.stderr.strip() == f"{bad}:3:1: duplicate key 'milter' (first defined at line 1)"


def test_config_from_environment(tmp_path):
    r = subprocess.run(MJ + ["config", "check"], capture_output=True, text=True, timeout=60,
                       env={"MJFILTER_CONFIG": CONF, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr


def test_plugins_lists_versions_hooks_and_order():
    r = run("plugins", "-c", CONF)
    assert r.returncode == 0
    assert "headers" in r.stdout and "mjfilter 0.1.0" in r.stdout
    assert "mjfilter_message" in r.stdout and "example-stamp" in r.stdout
    assert "1. strip-control-headers (use: headers; on_error: tempfail; may: change_header)" in r.stdout


def test_postfix_config():
    r = run("postfix-config", "-c", CONF)
    assert r.returncode == 0
    assert "smtpd_milters = inet:127.0.0.1:8894" in r.stdout
    assert "milter_default_action = tempfail" in r.stdout
    assert "127.0.0.1:10026 inet n - n - - smtpd" in r.stdout and "no_milters" in r.stdout
    main = run("postfix-config", "-c", CONF, "--main").stdout
    assert "smtpd_milters" in main and "10026" not in main


def test_reload_without_daemon_says_so(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(f"state_dir: {tmp_path}\n")
    r = run("reload", "-c", str(conf))
    assert r.returncode == 1 and "no daemon answers on" in r.stderr


def test_check_is_a_dry_run_unless_commit(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(f"state_dir: {tmp_path}\nchain:\n  - use: headers\n  - use: dedup\n")
    args = ["check", "-c", str(conf), "--sender", "app@shop.example", "--rcpt", "bob@example.org",
            str(DATA / "all-vendors.eml"), "--json"]
    verdicts = [json.loads(run(*args).stdout)["verdict"] for _ in range(2)]
    assert verdicts == ["accept", "accept"]  # nothing kept: the same check twice gives the same answer
    verdicts = [json.loads(run(*args, "--commit").stdout)["verdict"] for _ in range(2)]
    assert verdicts == ["accept", "accept"]  # a retry of the same message is never a duplicate
    other = (DATA / "all-vendors.eml").read_bytes().replace(b"<20261124070000.1234@", b"<another@")
    (tmp_path / "other.eml").write_bytes(other)
    args[-2] = str(tmp_path / "other.eml")
    out = json.loads(run(*args, "--commit").stdout)
    assert out["verdict"] == "discard" and out["events"][0]["error"] == "duplicate in campaign"
