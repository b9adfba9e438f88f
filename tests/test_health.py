"""`mjfilter health`: against a real `mjfilter run` daemon, a stopped one, and fakes of each socket."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mjd import Daemon
from mjfilter.config import load_config
from mjfilter.control import ControlServer
from mjfilter.health import check_daemon, check_milter
from rig import Sink, free_port

CHAIN = [{"use": "headers"}]


def health(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mjfilter", "health", "-c", str(conf), "--timeout", "3", *args],
                          capture_output=True, text=True, timeout=60)


def lines(out: str) -> dict[str, str]:
    """check name -> its status word ("ok" or "FAIL")."""
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("health"), CHAIN, metrics={"listen": f"127.0.0.1:{free_port()}"})
    with d:
        yield d


def test_running_daemon_is_healthy(daemon):
    r = health(daemon.conf)
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines(r.stdout) == {"daemon": "ok", "store": "ok", "milter": "ok", "metrics": "ok"}
    assert f"pid {daemon.proc.pid}" in r.stdout and "milter protocol version 6" in r.stdout
    assert "0 in flight" in r.stdout


def test_json_output(daemon):
    r = health(daemon.conf, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True
    assert [c["check"] for c in out["checks"]] == ["daemon", "store", "milter", "metrics"]
    assert all(set(c) == {"check", "ok", "detail"} and c["ok"] for c in out["checks"])


def test_status_reports_in_flight_and_draining(daemon):
    r = daemon.mjfilter("status")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["in_flight"] == 0 and status["draining"] is False and status["version"]


def test_handshake_leaves_the_daemon_serving(daemon):
    for _ in range(3):
        assert health(daemon.conf).returncode == 0
    assert "Traceback" not in daemon.log() and "ERROR" not in daemon.log()


def test_stopped_daemon_fails(tmp_path):
    d = Daemon(tmp_path / "mj", CHAIN)
    with d:
        assert health(d.conf).returncode == 0
    r = health(d.conf)
    assert r.returncode == 1
    assert lines(r.stdout) == {"daemon": "FAIL", "store": "ok", "milter": "FAIL"}
    assert "no daemon answers on" in r.stdout
    out = json.loads(health(d.conf, "--json").stdout)
    assert out["ok"] is False and [c["ok"] for c in out["checks"]] == [False, True, False]


def test_unreachable_store_fails(tmp_path):
    d = Daemon(tmp_path / "mj", CHAIN, store={"url": "redis://127.0.0.1:1/0", "timeout": 0.5})
    r = health(d.conf)
    assert r.returncode == 1 and lines(r.stdout)["store"] == "FAIL"
    assert "redis://127.0.0.1:1/0" in r.stdout


def test_configuration_error_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("metrics: {listen: nowhere}\n")
    r = health(bad)
    assert r.returncode == 2 and r.stderr.startswith(f"{bad}:1:19: metrics.listen: ")


def test_draining_daemon_fails(write_config):
    from mjfilter.app import App

    loaded = load_config(write_config([], control={"socket": os.path.join(tempfile.mkdtemp(prefix="mjh"), "c.sock")}))
    app = App(loaded)
    control = ControlServer(app, loaded.config.control_socket)
    control.start()
    try:
        assert check_daemon(loaded, 3).ok
        app.draining = True
        c = check_daemon(loaded, 3)
        assert not c.ok and c.detail.startswith("shutting down")
    finally:
        control.stop()
        app.close()


def fake_milter(path: str, reply: bytes) -> threading.Thread:
    """A unix-socket server that answers one connection's first packet with ``reply``."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            (n,) = struct.unpack("!I", conn.recv(4))
            packet = conn.recv(n)
            assert packet[:1] == b"O"
            conn.sendall(reply)
            try:
                conn.recv(16)  # the quit (or a reset, when the client gave up on a bad reply)
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("reply, ok", [
    (struct.pack("!I", 13) + b"O" + struct.pack("!III", 6, 1, 0), True),
    (b"220 smtp.example ESMTP\r\n", False),  # an SMTP server on the milter's address
])
def test_milter_check_over_a_unix_socket(write_config, reply, ok):
    d = tempfile.mkdtemp(prefix="mjm")
    path = os.path.join(d, "milter.sock")
    t = fake_milter(path, reply)
    try:
        c = check_milter(load_config(write_config([], milter={"listen": f"unix:{path}"})), 3)
        t.join(5)
        assert c.ok is ok, c.detail
        assert (c.detail == f"unix:{path} answers (milter protocol version 6)") if ok else "not a milter" in c.detail
    finally:
        os.unlink(path)
        os.rmdir(d)


def test_milter_check_against_smtp_over_tcp(write_config):
    with Sink() as sink:
        c = check_milter(load_config(write_config([], milter={"listen": f"inet:127.0.0.1:{sink.port}"})), 3)
    assert not c.ok and "not a milter reply" in c.detail


def test_help_is_a_manual_page():
    r = subprocess.run([sys.executable, "-m", "mjfilter", "health", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for word in ("daemon", "store", "milter", "metrics", "--json", "exits", "0600"):
        assert word in r.stdout
