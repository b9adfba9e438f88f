"""Benchmark: dedup reservations per second on each store backend, and the latency the
dedup chain adds per message through a real Postfix.

    make bench-dedup        (or: .venv/bin/python bench/dedup.py [--messages N])

Prints figures measured in this run; compare ratios, not absolutes (a 2-core
machine varies 10-30% between runs). Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mjd import Daemon, world_main_cf  # noqa: E402
from redis_rig import RedisServer  # noqa: E402
from rig import PostfixRig, Sink  # noqa: E402

from mjfilter.store import open_store  # noqa: E402


def reservations_per_second(store, seconds: float, threads: int) -> float:
    """Each call is what the dedup step does for a one-recipient message: one reserve() round-trip."""
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        n = 0
        prefix = uuid.uuid4().hex
        while time.monotonic() < stop:
            store.reserve([f"dedup:{prefix}:{n}"], f"holder-{prefix}-{n}")
            n += 1
        counts[i] = n

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / seconds


def latencies(port: int, n: int, dedup: bool) -> list[float]:
    import smtplib

    out = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("bench.test.invalid")
        for i in range(n):
            head = (f"From: app@shop.example\r\nTo: r{i}@example.org\r\nSubject: bench\r\n"
                    f"Message-ID: <{uuid.uuid4().hex}@shop.example>\r\n")
            if dedup:
                head += "X-Mailjet-Campaign: bench\r\nX-Mailjet-DeduplicateCampaign: yes\r\n"
            data = head + "\r\n" + "x" * 70 + "\r\n"
            t0 = time.perf_counter()
            s.sendmail("app@shop.example", [f"r{i}@example.org"], data.encode())
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=300, help="messages per Postfix scenario (default 300)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per store measurement (default 3)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mjfilter-bench-"))
    os.chmod(base, 0o755)
    print(f"cores: {os.cpu_count()}; messages per scenario: {args.messages}")

    print("\n== dedup reservations per second (one reserve() round-trip per message) ==")
    with RedisServer(base / "redis") as redis:
        stores = {"sqlite": open_store(f"sqlite:///{base / 'bench.db'}", timeout=5),
                  "redis": open_store(redis.url, timeout=5, prefix=f"bench{uuid.uuid4().hex}:")}
        rates = {}
        for name, store in stores.items():
            for threads in (1, 8):
                rates[(name, threads)] = reservations_per_second(store, args.seconds, threads)
                print(f"  {name:<7} {threads} thread(s): {rates[(name, threads)]:9.0f} /s")
            store.close()
        print(f"  redis/sqlite (8 threads): {rates[('redis', 8)] / rates[('sqlite', 8)]:.2f}x")

        print("\n== latency per message through Postfix, one SMTP session (client-side ms) ==")
        scenarios = {
            "postfix, no milter": (None, None, False),
            "mjfilter headers only": ([{"use": "headers"}], None, False),
            "mjfilter + dedup, sqlite": ([{"use": "headers"}, {"use": "dedup"}], None, True),
            "mjfilter + dedup, redis": ([{"use": "headers"}, {"use": "dedup"}], {"url": redis.url}, True),
        }
        results: dict[str, tuple[float, float, float]] = {}
        for i, (label, (chain, store, dedup)) in enumerate(scenarios.items()):
            with Sink() as sink:
                daemon = None
                main: dict[str, str] = {}
                if chain is not None:
                    daemon = Daemon(base / f"mj{i}", chain, **({"store": store} if store else {})).start()
                    main = world_main_cf(daemon)
                try:
                    with PostfixRig(base / f"pf{i}", relay_port=sink.port, main_cf=main) as pf:
                        latencies(pf.smtp_port, 20, dedup)  # warm-up
                        lat = latencies(pf.smtp_port, args.messages, dedup)
                        pf.wait_queue_empty(timeout=120)
                finally:
                    if daemon is not None:
                        daemon.stop()
            results[label] = (statistics.median(lat), pct(lat, 99), 1000 / statistics.mean(lat))
            p50, p99, rate = results[label]
            print(f"  {label:<26} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  {rate:6.0f} msgs/s")
        base_p50 = results["postfix, no milter"][0]
        hdr_p50 = results["mjfilter headers only"][0]
        for label in ("mjfilter + dedup, sqlite", "mjfilter + dedup, redis"):
            p50 = results[label][0]
            print(f"  added by dedup ({label.split(', ')[1]}): {p50 - hdr_p50:+.2f} ms p50 over headers only; "
                  f"{p50 - base_p50:+.2f} ms over no milter; throughput {results[label][2] / results['postfix, no milter'][2]:.2f}x no-milter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
