"""Logging targets: standard error and syslog (a unix datagram socket the test makes stands in for syslogd)."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mjfilter.config import ConfigError, load_config
from mjfilter.logsetup import queue_id, setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


@pytest.fixture
def syslogd() -> Iterator[tuple[str, socket.socket]]:
    """A unix datagram socket in a short temporary directory (sun_path is at most 107 bytes)."""
    d = tempfile.mkdtemp(prefix="mjlog")
    path = os.path.join(d, "log")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    try:
        yield path, s
    finally:
        s.close()
        os.unlink(path)
        os.rmdir(d)


def test_syslog_target_sends_escaped_lines_with_ident_facility_and_queue_id(restore_logging, syslogd):
    path, server = syslogd
    setup_logging("info", target="syslog", facility="mail", syslog_socket=path)
    token = queue_id.set("4XyZ12")
    try:
        logging.getLogger("mjfilter.txn").info("from=<%s> verdict=accept", "app\r\nforged@shop.example")
        logging.getLogger("mjfilter.test").debug("not at info level")
        logging.getLogger("mjfilter.test").warning("second")
    finally:
        queue_id.reset(token)
    first = server.recv(4096).decode()
    second = server.recv(4096).decode()
    # <PRI> = facility mail (2) * 8 + severity info (6) = 22; warning (4) = 20
    assert first == (f"<22>mjfilter[{os.getpid()}]: INFO mjfilter.txn[4XyZ12]: "
                     "from=<app\\r\\nforged@shop.example> verdict=accept\x00")
    assert second == f"<20>mjfilter[{os.getpid()}]: WARNING mjfilter.test[4XyZ12]: second\x00"


def test_syslog_facility_is_configurable(restore_logging, syslogd):
    path, server = syslogd
    setup_logging("info", target="syslog", facility="local3", syslog_socket=path)
    logging.getLogger("x").info("hello")
    assert server.recv(4096).decode().startswith("<158>mjfilter[")  # local3 (19) * 8 + info (6)


def test_stderr_target_keeps_the_timestamp(restore_logging):
    stream = io.StringIO()
    setup_logging("info", stream)
    logging.getLogger("mjfilter.test").info("a\nb")
    line = stream.getvalue()
    assert line.endswith(" INFO mjfilter.test[-]: a\\nb\n") and line[:4].isdigit()


def test_a_syslog_socket_that_does_not_answer_is_reported_not_fatal(restore_logging, tmp_path, syslogd):
    missing = str(tmp_path / "nothing")
    problem = setup_logging("info", target="syslog", syslog_socket=missing)
    assert problem == f"syslog socket {missing} does not answer: No such file or directory"
    logging.getLogger("x").info("lost")  # no exception reaches the caller
    path, _ = syslogd
    assert setup_logging("info", target="syslog", syslog_socket=path) is None
    assert setup_logging("info", io.StringIO()) is None


def test_run_warns_when_syslog_does_not_answer(tmp_path):
    # a port nobody can bind makes `run` stop right after setting up logging
    conf = tmp_path / "c.yaml"
    conf.write_text(f"state_dir: {tmp_path / 'state'}\nmilter: {{listen: 'inet:192.0.2.1:1'}}\n"
                    f"logging: {{target: syslog, syslog_socket: {tmp_path / 'nothing'}}}\nchain: []\n")
    r = subprocess.run([sys.executable, "-m", "mjfilter", "run", "-c", str(conf)], capture_output=True, text=True,
                       timeout=60)
    assert f"mjfilter: warning: syslog socket {tmp_path / 'nothing'} does not answer" in r.stderr
    assert r.returncode == 1


@pytest.mark.parametrize("logging_cfg, message", [
    ({"target": "journal"}, "logging.target: Input should be 'stderr' or 'syslog'"),
    ({"facility": "nosuch"}, "logging.facility: unknown syslog facility 'nosuch'"),
    ({"syslog_socket": "dev/log"}, "logging.syslog_socket: syslog_socket must be an absolute path"),
    ({"ident": "x"}, "unknown key 'ident' in logging"),
])
def test_logging_config_is_validated(write_config, logging_cfg, message):
    with pytest.raises(ConfigError, match=r"mjfilter.yaml:\d+:\d+: " + message.replace("(", r"\(")):
        load_config(write_config([], logging=logging_cfg))


def test_logging_defaults(write_config):
    cfg = load_config(write_config([])).config.logging
    assert (cfg.level, cfg.target, cfg.facility, cfg.syslog_socket) == ("info", "stderr", "mail", "/dev/log")
    assert load_config(write_config([], logging={"facility": "LOCAL0"})).config.logging.facility == "local0"


def test_shipped_configuration_documents_the_syslog_keys():
    text = (Path(__file__).parent.parent / "conf" / "mjfilter.yaml").read_text()
    assert "target:" in text and "facility:" in text and "metrics:" in text


def test_background_writer_keeps_queue_id_and_flushes_on_shutdown():
    """The daemon logs through one writer thread: queue id taken in the logging thread, nothing lost."""
    import logging
    import threading

    from mjfilter.logsetup import queue_id, setup_logging, shutdown_logging

    stream = io.StringIO()
    setup_logging("info", stream, background=True)
    try:
        def worker(qid: str) -> None:
            queue_id.set(qid)
            for i in range(50):
                logging.getLogger("mjfilter.txn").info("line %d\r\nforged", i)

        threads = [threading.Thread(target=worker, args=(f"Q{n}",)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("mjfilter").exception("failed")
    finally:
        shutdown_logging()
    out = stream.getvalue()
    lines = [x for x in out.splitlines() if "mjfilter.txn[" in x]
    assert len(lines) == 200  # every line written before shutdown returned
    assert sum("mjfilter.txn[Q2]: line" in x for x in lines) == 50
    assert all("\\r\\nforged" in x for x in lines)  # still escaped, still one line each
    assert "Traceback" in out and "ValueError: boom" in out
