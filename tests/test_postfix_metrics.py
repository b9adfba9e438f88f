"""Real Postfix -> `mjfilter run` with metrics.listen: the counters move under mail, scraped over HTTP."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import eml
from mjd import Daemon, world_main_cf
from rig import PostfixRig, Sink, free_port, smtp_send_many

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists(),
                       reason="postfix is not installed: run make test, which installs it"),
]

CHAIN = [{"use": "headers", "name": "strip-control-headers"}, {"use": "dedup"}]
N = 20


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of GET ``url``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def dedup_message(mid: str) -> bytes:
    return (f"From: app@shop.example\r\nTo: r@example.org\r\nMessage-ID: <{mid}@shop.example>\r\n"
            f"X-Mailjet-Campaign: metrics-test\r\nX-Mailjet-DeduplicateCampaign: yes\r\n\r\nHello.\r\n").encode()


def test_metrics_move_under_mail_and_health_follows_the_daemon(tmp_path):
    metrics_port = free_port()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with Sink() as sink:
        daemon = Daemon(tmp_path / "mj", CHAIN, metrics={"listen": f"127.0.0.1:{metrics_port}"})
        daemon.start()
        try:
            assert f"metrics on {url}" in daemon.log()
            with PostfixRig(tmp_path / "pf", relay_port=sink.port, main_cf=world_main_cf(daemon),
                            master_cf=daemon.postfix_config("master")) as pf:
                before = scrape(url)
                items = [("app@shop.example", [f"r{i}@example.org"],
                          eml("plain.eml").replace(b"<plain-1@", f"<metrics-{i}@".encode())) for i in range(N)]
                for start in range(0, N, 5):  # a few messages per connection
                    assert [r.code for r in smtp_send_many(pf.smtp_port, items[start:start + 5])] == [250] * 5
                # a campaign duplicate: the second is discarded by dedup (the client still gets 250)
                dups = [("app@shop.example", ["same@example.org"], dedup_message(f"dup-{i}")) for i in range(2)]
                assert [r.code for r in smtp_send_many(pf.smtp_port, dups)] == [250, 250]
                sink.wait_for(N + 1)
                after = scrape(url)

                health = [sys.executable, "-m", "mjfilter", "health", "-c", str(daemon.conf), "--timeout", "3"]
                r = subprocess.run(health, capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, r.stdout + r.stderr
        finally:
            daemon.stop()
        r = subprocess.run(health, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "FAIL daemon" in r.stdout and "FAIL milter" in r.stdout

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("mjfilter_messages_total", verdict="accept") == N + 1
    assert moved("mjfilter_messages_total", verdict="discard") == 1
    assert moved("mjfilter_messages_total", verdict="tempfail") == 0
    assert moved("mjfilter_step_seconds_count", step="strip-control-headers") == N + 2
    assert moved("mjfilter_step_seconds_bucket", step="strip-control-headers", le="+Inf") == N + 2
    assert moved("mjfilter_step_seconds_sum", step="strip-control-headers") > 0
    assert moved("mjfilter_step_seconds_count", step="dedup") == N + 2
    assert moved("mjfilter_events_total", event="blocked", error="duplicate in campaign") == 1
    assert moved("mjfilter_store_seconds_count", op="reserve") == 2  # only the messages that asked for dedup
    assert value(after, "mjfilter_transactions_in_flight") == 0
    assert value(after, "mjfilter_config_generation") == 0
    assert value(after, "process_resident_memory_bytes") > 0
    # no address, campaign or queue id in any label
    labels = " ".join(f"{k}={v}" for (_, ls) in after for k, v in ls)
    assert "@" not in labels and "metrics-test" not in labels
