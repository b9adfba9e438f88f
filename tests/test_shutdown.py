"""Stopping the daemon loses no mail: in-flight transactions finish, late ones get 4xx."""

from __future__ import annotations

import re
import threading
from datetime import datetime
import time
import uuid

import pytest

from mjd import Daemon, world_main_cf
from rig import PostfixRig, Sink, smtp_send


def test_drain_waits_for_in_flight_transactions(write_config):
    from mjfilter.app import App
    from mjfilter.config import load_config

    app = App(load_config(write_config([])))
    rt = app.acquire()
    t0 = time.monotonic()
    assert app.drain(0.2) == 1 and time.monotonic() - t0 >= 0.2
    assert app.draining
    threading.Timer(0.1, app.release, args=(rt,)).start()
    assert app.drain(5) == 0
    app.close()


@pytest.mark.postfix
def test_sigterm_under_load_loses_no_message(tmp_path):
    # a step slower than libmilter's ~1 s stop poll, so transactions are still in the chain
    # when milter.main() returns and the drain has to wait for them
    chain = [{"use": "headers"}, {"use": "test-slow", "config": {"ms": 2500}}]
    with Sink() as sink:
        daemon = Daemon(tmp_path / "mj", chain, milter={"drain_timeout": 8}).start()
        try:
            with PostfixRig(tmp_path / "pf", relay_port=sink.port, main_cf=world_main_cf(daemon)) as pf:
                replies: dict[str, int] = {}
                lock = threading.Lock()
                stop = threading.Event()

                def client(n: int) -> None:
                    i = 0
                    while not stop.is_set() and i < 200:
                        mid = f"{n}-{i}-{uuid.uuid4().hex[:8]}"
                        data = (f"From: app@shop.example\r\nTo: r@example.org\r\nMessage-ID: <{mid}@load>\r\n"
                                f"X-Mailjet-Campaign: load\r\n\r\nbody {mid}\r\n").encode()
                        code = smtp_send(pf.smtp_port, "app@shop.example", ["r@example.org"], data).code
                        with lock:
                            replies[mid] = code
                        i += 1

                threads = [threading.Thread(target=client, args=(n,)) for n in range(10)]
                for t in threads:
                    t.start()
                deadline = time.monotonic() + 30
                while len(replies) < 5 and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(0.3)  # the next wave is in the chain now
                sig_at = time.time()
                assert daemon.stop() == 0  # SIGTERM while messages are in the chain: clean exit
                time.sleep(0.5)  # clients keep sending while mjfilter is gone
                stop.set()
                for t in threads:
                    t.join(60)
                pf.wait_queue_empty(timeout=60)
                got = sink.messages
        finally:
            daemon.stop()
    accepted = {mid for mid, code in replies.items() if code == 250}
    others = {mid: code for mid, code in replies.items() if code != 250}
    assert accepted and others, (len(accepted), len(others))
    assert all(400 <= c < 500 for c in others.values()), others  # 4xx, never 5xx
    arrived = [re.search(rb"Message-ID: <([^@]+)@load>", g.data).group(1).decode() for g in got]
    assert sorted(arrived) == sorted(accepted)  # every 250 arrived, exactly once; nothing else did
    log = daemon.log()
    assert "stopping: letting in-flight messages finish" in log and "INFO mjfilter[-]: stopped" in log
    # transactions that were in the chain when SIGTERM came finished (accepted, and delivered above)
    finished_after = [x for x in log.splitlines() if "verdict=accept" in x
                      and datetime.strptime(x[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() > sig_at]
    assert finished_after, log[-2000:]
