"""Benchmark: mjfilter in front of a real Postfix, against no milter, a no-op pymilter
milter and OpenDKIM (a C milter), in one run.

    make bench                               (or: .venv/bin/python bench/bench.py [options])
    make bench BENCH_ARGS="--soak 100000"    (RSS over a long run)

Postfix's own load generator drives a throwaway Postfix, which relays to Postfix's
own sink, everything on 127.0.0.1::

    smtp-source -s SESSIONS -m MESSAGES -F FILE --> Postfix smtpd --(smtpd_milters)--> milter
                                                    Postfix smtp  --> smtp-sink -c

For every scenario (see SCENARIOS) and every load (1 and 20 sessions; a 2 KB plain
text message and a 100 KB HTML newsletter) it measures messages/s end to end (from
smtp-source's start until smtp-sink has counted the last message), the added
latency per message (a Python SMTP client sending sequentially over one session,
client-side time per transaction, minus the no-milter p50), the milter process's
CPU ms per message (utime+stime from /proc) and its peak RSS (VmHWM), and ratios
to the no-milter, the no-op (same socket type) and the OpenDKIM-over-unix: runs.

Prints the machine's core count and a table; writes OUT/results.csv and
OUT/chart.png (OUT: bench/out by default). Figures vary 10-30% between runs on
a small machine: compare the ratios measured in one run. Everything stops by
itself: every wait has a deadline, every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import os
import random
import re
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT / "tests"))

import yaml
from mjd import Daemon, world_main_cf
from rig import LOOPBACK, PostfixRig, free_port, make_traversable, wait_port, wait_unix

SENDER = "app@bench.example"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SIZES = {"2KB": 2 * 1024, "100KB": 100 * 1024}


# --------------------------------------------------------------------------- helpers


def find_cmd(name: str) -> str:
    for d in (*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/usr/bin", "/sbin"):
        if d and os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    raise SystemExit(f"{name} not found: run `make bench`, which installs it")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def proc_status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status (VmHWM: peak RSS, VmRSS: RSS now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL to its process group (started with start_new_session) after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)


def start_process(argv: list[str], log: Path, listen: str, timeout: float = 20.0) -> subprocess.Popen[bytes]:
    """Start a milter in its own session, logging to ``log``; wait until ``listen`` accepts connections."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        wait_listen(listen, timeout, proc, log)
    except BaseException:
        stop_process(proc, 5)
        raise
    return proc


def wait_listen(listen: str, timeout: float, proc: subprocess.Popen[Any] | None = None,
                log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace") if log else ""
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{text[-3000:]}")
        try:
            if listen.startswith("unix:"):
                wait_unix(listen[5:], timeout=0.2)
            else:
                wait_port(LOOPBACK, int(listen.rsplit(":", 1)[1]), timeout=0.2)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {listen} after {timeout:g}s") from None


# --------------------------------------------------------------------------- smtp-sink


class SmtpSink:
    """Postfix's ``smtp-sink -c`` on 127.0.0.1: throws messages away and counts them.

    A reader thread parses its running counters (``sess=N quit=N mesg=N``) and keeps
    the message count and the time it last grew (the end of a throughput run).
    """

    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.base = base
        self.count = 0
        self.last_change = time.monotonic()
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SmtpSink:
        argv = [find_cmd("smtp-sink"), "-c"]
        if os.geteuid() == 0:
            argv += ["-u", "postfix"]  # required as root
        argv += [f"{LOOPBACK}:{self.port}", "256"]
        self._err = open(self.base / "smtp-sink.err", "ab")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._err, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_port(LOOPBACK, self.port, timeout=10)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        buf = b""
        stdout: Any = self.proc.stdout  # a BufferedReader: read1 returns what is there
        while chunk := stdout.read1(65536):
            buf += chunk
            *records, buf = re.split(rb"[\r\n]", buf)
            counts = [int(m.group(1)) for r in records if (m := re.search(rb"mesg=(\d+)", r))]
            if counts and counts[-1] != self.count:
                with self._cond:
                    self.count = counts[-1]
                    self.last_change = time.monotonic()
                    self._cond.notify_all()

    def wait_count(self, n: int, timeout: float) -> bool:
        """Wait until at least ``n`` messages were counted; False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5)
            self.proc = None
        if self._thread is not None:
            self._thread.join(5)
        self._err.close()


# --------------------------------------------------------------------------- messages


def plain_message(size: int, headers: list[str], tag: str) -> str:
    """A plain-text message of about ``size`` bytes (LF line endings, as smtp-source -F wants)."""
    head = [f"From: Bench Shop <{SENDER}>", "To: customer@example.org", "Subject: Your order confirmation",
            "Date: Mon, 24 Nov 2025 08:00:00 +0000", f"Message-ID: <{tag}@bench.example>", "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 7bit", *headers]
    text = "\n".join(head) + "\n\n"
    line = "Thank you for your order. Your parcel leaves our warehouse within two working days.\n"
    rng = random.Random(size)
    while len(text) < size:
        text += f"Item {rng.randrange(10000, 99999)}: " + line
    return text


def newsletter(size: int, headers: list[str], tag: str) -> str:
    """A ~``size`` bytes HTML newsletter: multipart/alternative, text and HTML, many links."""
    rng = random.Random(size)
    words = ["spring", "sale", "garden", "tools", "shoes", "outdoor", "season", "offer", "discount", "members", "new", "arrivals", "weekend", "delivery", "free", "returns", "collection", "jackets", "summer", "kitchen", "ideas"]

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."

    boundary = "=_bench_" + tag
    head = [f"From: Bench Shop <{SENDER}>", "To: customer@example.org", "Subject: This week at Bench Shop",
            "Date: Mon, 24 Nov 2025 08:00:00 +0000", f"Message-ID: <{tag}@bench.example>", "MIME-Version: 1.0",
            "List-Unsubscribe: <https://shop.example/unsubscribe?u=12345>",
            f'Content-Type: multipart/alternative; boundary="{boundary}"', *headers]
    html: list[str] = ['<!DOCTYPE html><html><head><meta charset="utf-8"><title>Bench Shop</title></head>',
                       '<body style="margin:0;padding:0;background:#f4f4f4;font-family:Arial,sans-serif">',
                       '<table role="presentation" width="100%" cellpadding="0" cellspacing="0">']
    txt: list[str] = ["This week at Bench Shop", ""]
    n = 0
    while sum(map(len, html)) + sum(map(len, txt)) < size - 1500:
        n += 1
        url = f"https://shop.example/p/{rng.randrange(100000, 999999)}?utm_source=newsletter&utm_campaign=week47"
        title, body = sentence(5), " ".join(sentence(12) for _ in range(3))
        html += ["<tr><td style=\"padding:16px 24px;background:#ffffff;border-bottom:1px solid #e0e0e0\">",
                 f'<h2 style="font-size:20px;color:#222222;margin:0 0 8px 0">{title}</h2>',
                 f'<img src="https://cdn.shop.example/img/{n}.jpg" width="552" alt="{title}" style="display:block">',
                 *[f'<p style="font-size:14px;line-height:20px;color:#444444">{part}</p>' for part in
                   (body[i:i + 600] for i in range(0, len(body), 600))],
                 (f'<a href="{url}" style="color:#ffffff;background:#d0021b;padding:8px 16px;'
                  f'text-decoration:none">Shop now</a></td></tr>')]
        txt += [title, body, url, ""]
    html += [('<tr><td style="padding:24px;font-size:11px;color:#888888">You receive this because you subscribed. '
              '<a href="https://shop.example/unsubscribe?u=12345">Unsubscribe</a></td></tr></table></body></html>')]

    def wrap(lines: list[str], width: int = 76) -> list[str]:  # 7bit: lines well under 998 bytes
        out = []
        for line in lines:
            while len(line) > width:
                cut = line.rfind(" ", 0, width)
                cut = cut if cut > 0 else width
                out.append(line[:cut])
                line = line[cut:].lstrip(" ")
            out.append(line)
        return out

    parts = ["\n".join(head), "", "This is a multi-part message in MIME format.", f"--{boundary}",
             "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 7bit", "", *wrap(txt),
             f"--{boundary}", "Content-Type: text/html; charset=utf-8", "Content-Transfer-Encoding: 7bit", "",
             *wrap(html), f"--{boundary}--", ""]
    return "\n".join(parts)


MESSAGES: dict[str, Callable[[int, list[str], str], str]] = {"2KB": plain_message, "100KB": newsletter}


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


# --------------------------------------------------------------------------- milters


@dataclass
class Milter:
    """A running milter: what Postfix needs to use it, and its process."""

    listen: str
    pid: int
    main_cf: dict[str, str] = field(default_factory=dict)
    master_cf: str = ""


@dataclass
class Ctx:
    """What setup functions get: a fresh directory, the run's directory, the cleanup stack."""

    base: Path
    run_dir: Path
    stack: ExitStack
    sink_port: int = 0  # where Postfix relays (smtp-sink): a smarthost route can point there too


def listen_for(ctx: Ctx, socket_type: str, name: str) -> str:
    if socket_type == "unix":
        return f"unix:{ctx.base / (name + '.sock')}"
    return f"inet:{LOOPBACK}:{free_port()}"


def plain_milter_cf(listen: str) -> dict[str, str]:
    return {"smtpd_milters": listen, "non_smtpd_milters": "$smtpd_milters"}


def setup_noop(socket_type: str) -> Callable[[Ctx], Milter]:
    def setup(ctx: Ctx) -> Milter:
        listen = listen_for(ctx, socket_type, "noop")
        proc = start_process([sys.executable, str(BENCH / "noop_milter.py"), listen], ctx.base / "noop.log", listen)
        ctx.stack.callback(stop_process, proc)
        return Milter(listen, proc.pid, plain_milter_cf(listen))
    return setup


def setup_opendkim(socket_type: str) -> Callable[[Ctx], Milter]:
    def setup(ctx: Ctx) -> Milter:
        key = ctx.run_dir / "dkim" / "bench.private"
        if not key.exists():  # one key per run, in the run's temporary directory
            key.parent.mkdir(exist_ok=True)
            subprocess.run([find_cmd("opendkim-genkey"), "-b", "2048", "-D", str(key.parent), "-d", "bench.example",
                            "-s", "bench"], check=True, timeout=60, capture_output=True)
        listen = listen_for(ctx, socket_type, "opendkim")
        kind, _, rest = listen.partition(":")
        socket_spec = f"local:{rest}" if kind == "unix" else f"inet:{rest.rsplit(':', 1)[1]}@{LOOPBACK}"
        conf = ctx.base / "opendkim.conf"
        conf.write_text((BENCH / "opendkim" / "opendkim.conf.in").read_text()
                        .replace("@KEYFILE@", str(key)).replace("@SOCKET@", socket_spec))
        proc = start_process([find_cmd("opendkim"), "-f", "-x", str(conf)], ctx.base / "opendkim.log", listen)
        ctx.stack.callback(stop_process, proc)
        return Milter(listen, proc.pid, plain_milter_cf(listen))
    return setup


def default_chain() -> list[dict[str, Any]]:
    """The chain of the shipped configuration (conf/mjfilter.yaml)."""
    return list(yaml.safe_load((ROOT / "conf" / "mjfilter.yaml").read_text())["chain"])


def routing_to_sink(ctx: Ctx) -> dict[str, Any]:
    """Routing that sends everything to the sink as a smarthost, through mjfilter's transports."""
    return {"routing": {
        "socketmap": f"inet:{LOOPBACK}:{free_port()}",
        "tls": "none",
        # smtp-sink announces AUTH and takes any login: the smarthost authenticates, as a real one would
        "smarthosts": {"relay": {"host": LOOPBACK, "port": ctx.sink_port, "tls": "none",
                                 "username": "bench", "password": "bench-secret"}},
        "default": "relay",
        "sender_maps": [{"inline": {"@elsewhere.example": "relay"}}],
        "priority": {3: "mjfilter-urgent"},
    }}


def setup_mjfilter(socket_type: str, chain: Callable[[], list[dict[str, Any]]] = default_chain,
                   more: Callable[[Ctx], dict[str, Any]] | None = None, **top: Any) -> Callable[[Ctx], Milter]:
    """mjfilter run with ``chain`` (default: the shipped one); ``top`` (and ``more(ctx)``): more
    top-level settings."""
    def setup(ctx: Ctx) -> Milter:
        listen = {"milter": {"listen": f"unix:{ctx.base / 'mjfilter.sock'}"}} if socket_type == "unix" else {}
        daemon = Daemon(ctx.base / "mj", chain(), **listen, **top, **(more(ctx) if more else {}))
        ctx.stack.callback(daemon.stop)
        daemon.start()
        assert daemon.proc is not None
        return Milter(daemon.listen, daemon.proc.pid, world_main_cf(daemon), daemon.postfix_config("master"))
    return setup


# --------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    """One configuration under test: ``setup`` starts its milter (None: Postfix alone) in
    ``ctx.base`` and registers its cleanup on ``ctx.stack``; ``headers`` are added to every
    message it sends (the control headers that switch features on)."""

    name: str
    setup: Callable[[Ctx], Milter] | None
    socket: str = ""  # inet | unix: ratios "x noop" compare with the no-op on the same socket type
    headers: list[str] = field(default_factory=list)
    about: str = ""


# Control headers an application sending through Mailjet typically adds; the shipped chain strips them.
APP_HEADERS = ["X-MJ-CustomID: order-4711", "X-Mailjet-TrackOpen: 0"]
DEDUP_HEADERS = ["X-Mailjet-Campaign: bench-week47", "X-Mailjet-DeduplicateCampaign: yes"]

SCENARIOS: list[Scenario] = [
    Scenario("no-milter", None, about="Postfix alone"),
    Scenario("noop-inet", setup_noop("inet"), "inet", about="bench/noop_milter.py, stall fixed"),
    Scenario("noop-unix", setup_noop("unix"), "unix", about="bench/noop_milter.py"),
    Scenario("opendkim-inet", setup_opendkim("inet"), "inet", about="OpenDKIM signing, Debian's package, as shipped"),
    Scenario("opendkim-unix", setup_opendkim("unix"), "unix", about="OpenDKIM signing"),
    Scenario("mjfilter-default-inet", setup_mjfilter("inet"), "inet", APP_HEADERS,
             about="shipped chain (headers, suppression, dedup); 2 control headers stripped"),
    Scenario("mjfilter-default-unix", setup_mjfilter("unix"), "unix", APP_HEADERS,
             about="shipped chain (headers, suppression, dedup); 2 control headers stripped"),
    Scenario("mjfilter-dedup-inet", setup_mjfilter("inet"), "inet", DEDUP_HEADERS,
             about="shipped chain, campaign dedup asked by the headers, SQLite store"),
    Scenario("mjfilter-dedup-unix", setup_mjfilter("unix"), "unix", DEDUP_HEADERS,
             about="shipped chain, campaign dedup asked by the headers, SQLite store"),
    Scenario("mjfilter-dedup-routing-inet", setup_mjfilter("inet", more=routing_to_sink), "inet",
             DEDUP_HEADERS + ["X-Mailjet-Prio: 3"],
             about="shipped chain + routing: dedup, the smarthost and Prio 3's transport via the route header"),
    Scenario("mjfilter-dedup-routing-unix", setup_mjfilter("unix", more=routing_to_sink), "unix",
             DEDUP_HEADERS + ["X-Mailjet-Prio: 3"],
             about="shipped chain + routing: dedup, the smarthost and Prio 3's transport via the route header"),
    # TODO(templating, tracking): same shape, their chain step(s) and the headers that switch them on.
]

QUICK_SCENARIOS = ["no-milter", "noop-inet", "noop-unix", "mjfilter-default-inet", "mjfilter-default-unix"]


# --------------------------------------------------------------------------- measurements


@dataclass
class Row:
    scenario: str
    socket: str
    size: str
    sessions: int
    messages: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    p50: float | None = None
    p99: float | None = None
    added_p50: float | None = None
    added_p99: float | None = None
    cpu_ms: float | None = None
    rss_mb: float | None = None
    x_none: float | None = None
    x_noop: float | None = None
    x_dkim: float | None = None
    note: str = ""


def latencies(port: int, n: int, size: str, headers: list[str], tag: str) -> tuple[list[float], int]:
    """Send ``n`` messages sequentially over one SMTP session; client-side ms per transaction, and errors."""
    out: list[float] = []
    errors = 0
    template = MESSAGES[size](SIZES[size], headers, "MSGID")
    with smtplib.SMTP(LOOPBACK, port, local_hostname="bench.example", timeout=60) as s:
        s.ehlo()
        for i in range(n):
            rcpt = f"lat{i}-{tag}@example.org"
            data = crlf(template.replace("<MSGID@", f"<{uuid.uuid4().hex}@", 1)
                        .replace("To: customer@example.org", f"To: {rcpt}", 1))
            t0 = time.perf_counter()
            try:
                s.sendmail(SENDER, [rcpt], data)
            except smtplib.SMTPResponseException:
                errors += 1
                continue
            out.append((time.perf_counter() - t0) * 1e3)
    return out, errors


def throughput(pf: PostfixRig, sink: SmtpSink, msg_file: Path, sessions: int, messages: int,
               tag: str, max_seconds: float) -> tuple[int, float, str]:
    """smtp-source -> Postfix -> smtp-sink: (messages delivered, seconds from start to the last one, note)."""
    argv = [find_cmd("smtp-source"), "-s", str(sessions), "-m", str(messages), "-N", "-t", f"{tag}@example.org",
            "-f", SENDER, "-M", "bench.example", "-F", str(msg_file), f"{LOOPBACK}:{pf.smtp_port}"]
    count0 = sink.count
    note = ""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=max_seconds)
    except subprocess.TimeoutExpired:
        stop_process(proc, 5)
        _, err = proc.communicate(timeout=5)
        note = f"capped at {max_seconds:g}s"
    else:
        if proc.returncode != 0:
            note = f"smtp-source exit {proc.returncode}: {err.decode(errors='replace').strip()[-200:]}"
    drain = 60 + messages / 20
    if not note and not sink.wait_count(count0 + messages, drain):
        note = f"only {sink.count - count0} of {messages} arrived within {drain:g}s"
    pf.wait_queue_empty(timeout=drain)  # nothing left over for the next load
    if note:  # stopped midway: a transaction may still be on its way through smtpd and cleanup
        settle = time.monotonic() + 30
        while time.monotonic() - sink.last_change < 2 and time.monotonic() < settle:
            time.sleep(0.1)
        pf.wait_queue_empty(timeout=drain)
    return sink.count - count0, max(sink.last_change - t0, 1e-6), note


def run_scenario(sc: Scenario, args: argparse.Namespace, run_dir: Path, index: int) -> list[Row]:
    rows: list[Row] = []
    base = run_dir / f"{index:02d}-{sc.name}"
    base.mkdir()
    make_traversable(base)
    with ExitStack() as stack:
        sink = SmtpSink(base).start()
        stack.callback(sink.stop)
        milter = sc.setup(Ctx(base, run_dir, stack, sink.port)) if sc.setup else None
        pf = PostfixRig(base / "postfix", relay_port=sink.port,
                        main_cf=milter.main_cf if milter else {}, master_cf=milter.master_cf if milter else "")
        stack.enter_context(pf)
        files = {}
        for size in args.sizes:
            files[size] = base / f"message-{size}.eml"
            files[size].write_text(MESSAGES[size](SIZES[size], sc.headers, f"bench-{sc.name}-{size}"))
        # warm-up: Postfix's processes spawned, the milter's first-use costs paid
        lat, errors = latencies(pf.smtp_port, 20, "2KB", sc.headers, f"warm-{uuid.uuid4().hex[:8]}")
        if errors:
            raise RuntimeError(f"{sc.name}: {errors} of 20 warm-up messages refused; see {base}")
        lats: dict[str, tuple[list[float], int]] = {}
        for size in args.sizes:
            lats[size] = latencies(pf.smtp_port, args.latency_messages, size, sc.headers,
                                   f"lat-{uuid.uuid4().hex[:8]}")
        pf.wait_queue_empty(timeout=120)
        for size in args.sizes:
            lat, lat_errors = lats[size]
            for sessions in args.sessions:
                cpu0 = proc_cpu_seconds(milter.pid) if milter else 0.0
                n, secs, note = throughput(pf, sink, files[size], sessions, args.messages,
                                           f"{sc.name}-{size}-{sessions}-{uuid.uuid4().hex[:6]}", args.max_seconds)
                row = Row(sc.name, sc.socket, size, sessions, n, secs, n / secs, note=note)
                if lat:
                    row.p50, row.p99 = statistics.median(lat), pct(lat, 99)
                if lat_errors:
                    row.note = (row.note + f"; {lat_errors} latency messages refused").lstrip("; ")
                if milter and n:
                    row.cpu_ms = (proc_cpu_seconds(milter.pid) - cpu0) * 1e3 / n
                    row.rss_mb = proc_status_kb(milter.pid, "VmHWM") / 1024
                rows.append(row)
                print(f"  {sc.name:<24} {size:>5} {sessions:>2} sess: {n:6d} msgs {row.rate:7.0f}/s"
                      + (f"  ({row.note})" if row.note else ""), flush=True)
    return rows


def add_ratios(rows: list[Row]) -> None:
    by = {(r.scenario, r.size, r.sessions): r for r in rows}
    base_p50 = {r.size: r.p50 for r in rows if r.scenario == "no-milter"}

    def ratio(r: Row, other: str) -> float | None:
        o = by.get((other, r.size, r.sessions))
        return r.rate / o.rate if o and o.rate else None

    for r in rows:
        r.x_none = ratio(r, "no-milter")
        r.x_noop = ratio(r, f"noop-{r.socket}") if r.socket else None
        r.x_dkim = ratio(r, "opendkim-unix")
        b = base_p50.get(r.size)
        if b is not None and r.p50 is not None and r.p99 is not None:
            r.added_p50, r.added_p99 = r.p50 - b, r.p99 - b


COLUMNS = [  # (header, width, format of the Row attribute)
    ("scenario", 22, "scenario"), ("size", 5, "size"), ("sess", 4, "sessions"), ("msgs", 5, "messages"),
    ("msgs/s", 6, "rate:.0f"), ("x none", 6, "x_none:.2f"), ("x noop", 6, "x_noop:.2f"),
    ("x dkim-u", 8, "x_dkim:.2f"), ("+p50 ms", 7, "added_p50:.2f"), ("+p99 ms", 7, "added_p99:.2f"),
    ("cpu ms/msg", 10, "cpu_ms:.2f"), ("rss MB", 6, "rss_mb:.1f"),
]


def cell(r: Row, spec: str) -> str:
    name, _, fmt = spec.partition(":")
    v = getattr(r, name)
    return "-" if v is None else format(v, fmt)


def table(rows: list[Row]) -> str:
    lines = [" ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w, _) in enumerate(COLUMNS))]
    lines.append("-" * len(lines[0]))
    for r in rows:
        line = " ".join(cell(r, spec).rjust(w) if i else cell(r, spec).ljust(w)
                        for i, (_, w, spec) in enumerate(COLUMNS))
        lines.append(line + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    names = list(Row.__dataclass_fields__)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(names)
        for r in rows:
            w.writerow(["" if (v := getattr(r, n)) is None else (f"{v:.4g}" if isinstance(v, float) else v)
                        for n in names])


def write_chart(rows: list[Row], path: Path, sessions: list[int], sizes: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.scenario for r in rows))
    by = {(r.scenario, r.size, r.sessions): r.rate for r in rows}
    fig, axes = plt.subplots(len(sizes), 1, figsize=(max(8, 1.1 * len(names)), 4.2 * len(sizes)), squeeze=False)
    width = 0.8 / len(sessions)
    for ax, size in zip(axes[:, 0], sizes):
        for j, s in enumerate(sessions):
            xs = [i + (j - (len(sessions) - 1) / 2) * width for i in range(len(names))]
            vals = [by.get((n, size, s), 0.0) for n in names]
            bars = ax.bar(xs, vals, width, label=f"{s} session{'s' if s > 1 else ''}")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("messages/s")
        ax.set_title(f"smtp-source -> Postfix -> smtp-sink, {size} messages, {os.cpu_count()} cores")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(rows: list[Row]) -> list[tuple[str, bool | None, str]]:
    """Issue 5's targets that this run can check: (target, holds (None: not measured), figures)."""
    by = {(r.scenario, r.size, r.sessions): r for r in rows}
    out: list[tuple[str, bool | None, str]] = []
    for sock in ("unix", "inet"):
        r = by.get((f"mjfilter-default-{sock}", "2KB", 20))
        dk, noop = by.get(("opendkim-unix", "2KB", 20)), by.get((f"noop-{sock}", "2KB", 20))
        if r and dk and dk.rate:
            out.append((f"20 sessions 2 KB, default chain {sock}: >= 1.0x OpenDKIM-unix",
                        r.rate >= dk.rate, f"{r.rate:.0f} vs {dk.rate:.0f}/s = {r.rate / dk.rate:.2f}x"))
        if r and noop and noop.rate:
            out.append((f"20 sessions 2 KB, default chain {sock}: >= 0.8x no-op {sock}",
                        r.rate >= 0.8 * noop.rate, f"{r.rate:.0f} vs {noop.rate:.0f}/s = {r.rate / noop.rate:.2f}x"))
        one = by.get((f"mjfilter-default-{sock}", "2KB", 1))
        if one:
            out.append((f"1 session 2 KB, default chain {sock}: >= 250 msgs/s", one.rate >= 250, f"{one.rate:.0f}/s"))
        if one and one.added_p99 is not None:
            out.append((f"p99 added latency 2 KB, default chain {sock}: < 20 ms", one.added_p99 < 20,
                        f"{one.added_p99:.2f} ms (p50 +{one.added_p50:.2f} ms)"))
        for s in (1, 20):
            noop = by.get((f"noop-{sock}", "100KB", s))
            for name, what in ((f"mjfilter-dedup-routing-{sock}", "dedup SQLite + routing"),
                               (f"mjfilter-dedup-{sock}", "dedup SQLite (no routing)")):
                d = by.get((name, "100KB", s))
                if d and noop and noop.rate:
                    out.append((f"{what} 100 KB {s} session(s) {sock}: >= 0.7x no-op {sock}",
                                d.rate >= 0.7 * noop.rate,
                                f"{d.rate:.0f} vs {noop.rate:.0f}/s = {d.rate / noop.rate:.2f}x"))
    return out


# --------------------------------------------------------------------------- soak


def soak(total: int, sessions: int, run_dir: Path, max_seconds: float) -> int:
    """``total`` messages through mjfilter's shipped chain (unix:, dedup asked, SQLite): RSS every 10%."""
    sc = Scenario("mjfilter-soak-unix", setup_mjfilter("unix"), "unix", DEDUP_HEADERS)
    base = run_dir / "soak"
    base.mkdir()
    make_traversable(base)
    step = max(1, total // 10)
    samples: list[tuple[int, int, int, int]] = []
    with ExitStack() as stack:
        sink = SmtpSink(base).start()
        stack.callback(sink.stop)
        assert sc.setup is not None
        milter = sc.setup(Ctx(base, run_dir, stack))
        pf = stack.enter_context(PostfixRig(base / "postfix", relay_port=sink.port, main_cf=milter.main_cf,
                                            master_cf=milter.master_cf))
        msg = base / "message.eml"
        msg.write_text(plain_message(SIZES["2KB"], sc.headers, "bench-soak"))
        print(f"soak: {total} messages of 2 KB, {sessions} sessions, mjfilter shipped chain over unix:, "
              f"dedup asked (a fresh recipient each: one SQLite reservation per message)", flush=True)
        print(f"  {'messages':>9} {'msgs/s':>7} {'VmRSS MB':>9} {'VmHWM MB':>9} {'open fds':>8}")
        sent = 0
        stopped = ""
        t_start = time.monotonic()
        while sent < total:
            n = min(step, total - sent)
            got, secs, note = throughput(pf, sink, msg, sessions, n, f"soak{sent}-{uuid.uuid4().hex[:6]}",
                                         max_seconds)
            sent += got
            if milter_alive := Path(f"/proc/{milter.pid}").exists():
                samples.append((sent, proc_status_kb(milter.pid, "VmRSS"), proc_status_kb(milter.pid, "VmHWM"),
                                len(os.listdir(f"/proc/{milter.pid}/fd"))))
                print(f"  {sent:>9} {got / secs:>7.0f} {samples[-1][1] / 1024:>9.1f} {samples[-1][2] / 1024:>9.1f} "
                      f"{samples[-1][3]:>8}", flush=True)
            if note or not milter_alive:
                note = note or "mjfilter exited"
                log = (base / "mj" / "mjfilter.log").read_text(errors="replace").splitlines()
                stopped = f"stopped after {sent} messages: {note}; mjfilter's last warnings and errors:\n" + "\n".join(
                    [ln for ln in log if " INFO " not in ln][-5:])
                print(f"  {stopped}", flush=True)
                break
        elapsed = time.monotonic() - t_start
    if len(samples) < 2:
        print(f"soak: too few samples to compare ({len(samples)}); try a smaller N to see the trend")
    if not samples:
        print("soak: no message went through")
        return 1
    first, last = samples[0], samples[-1]
    growth = last[1] / first[1] - 1
    holds = growth <= 0.10 and not stopped
    print(f"\nRSS at {first[0]} messages: {first[1] / 1024:.1f} MB; at {last[0]}: {last[1] / 1024:.1f} MB "
          f"({growth:+.1%}); open fds {first[3]} -> {last[3]}; {sent / elapsed:.0f} msgs/s over {elapsed:.0f}s")
    print(f"target: RSS flat within 10% from 10% to 100% of {total} messages: {'HOLDS' if holds else 'DOES NOT HOLD'}"
          + (" (the run stopped early)" if stopped else ""))
    return 0


# --------------------------------------------------------------------------- main


def select(names: str | None, quick: bool) -> list[Scenario]:
    if quick and not names:
        return [s for s in SCENARIOS if s.name in QUICK_SCENARIOS]
    if not names:
        return list(SCENARIOS)
    pats = [p.strip() for p in names.split(",") if p.strip()]
    chosen = [s for s in SCENARIOS if s.name == "no-milter" or any(fnmatch.fnmatch(s.name, p) or s.name == p
                                                                   for p in pats)]
    unknown = [p for p in pats if not any(fnmatch.fnmatch(s.name, p) for s in SCENARIOS)]
    if unknown:
        raise SystemExit(f"--only: no scenario matches {unknown}; scenarios: {', '.join(s.name for s in SCENARIOS)}")
    return chosen


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, help="messages per load (default 2000; --quick: 30)")
    ap.add_argument("--latency-messages", type=int, help="messages per latency measurement (default 200; --quick: 30)")
    ap.add_argument("--only", metavar="NAMES", help="comma-separated scenario names or globs (no-milter, the "
                    "baseline, always runs); e.g. --only 'noop-*,mjfilter-default-*'")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 30 messages, 1 and 2 sessions, 2 KB only, "
                    "no-milter/noop/mjfilter-default, no chart")
    ap.add_argument("--max-seconds", type=float, default=30.0,
                    help="cap per load: smtp-source is stopped after this many seconds and the rate is what "
                    "arrived (default 30; only the stalling OpenDKIM-over-inet 1-session load hits it)")
    ap.add_argument("--soak", type=int, metavar="N", help="instead: N messages through the shipped chain, RSS "
                    "every 10%% (e.g. 100000)")
    ap.add_argument("--out", type=Path, default=BENCH / "out", help="where results.csv and chart.png go "
                    "(default bench/out)")
    ap.add_argument("--keep", action="store_true", help="keep the run's temporary directory (logs, configs)")
    args = ap.parse_args(argv)
    args.messages = args.messages or (30 if args.quick else 2000)
    args.latency_messages = args.latency_messages or (30 if args.quick else 200)
    args.sessions = [1, 2] if args.quick else [1, 20]
    args.sizes = ["2KB"] if args.quick else ["2KB", "100KB"]
    scenarios = select(args.only, args.quick)

    if os.geteuid() != 0:
        raise SystemExit("bench.py runs a private Postfix and must run as root (make bench)")
    # SIGTERM: unwind like Ctrl-C, so that every `finally` stops what it started.
    signal.signal(signal.SIGTERM, _interrupt)
    run_dir = Path(tempfile.mkdtemp(prefix="mjfilter-bench-"))
    os.chmod(run_dir, 0o755)
    try:
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                          if ln.startswith("model name")), "?")
        pf_version = subprocess.run([find_cmd("postconf"), "-dh", "mail_version"], capture_output=True,
                                    text=True, check=False).stdout.strip()
        print(f"cores: {os.cpu_count()} ({cpu_model}); Postfix {pf_version}; Python {sys.version.split()[0]}; "
              f"load average before the run {os.getloadavg()[0]:.2f} (other work on the machine skews the figures)")
        if args.soak:
            return soak(args.soak, 20, run_dir, args.max_seconds * 100)
        print(f"messages per load: {args.messages}; latency: {args.latency_messages} sequential messages over "
              f"one session; sessions {args.sessions}; sizes {args.sizes}; run dir {run_dir}", flush=True)
        rows: list[Row] = []
        t0 = time.monotonic()
        for i, sc in enumerate(scenarios):
            rows += run_scenario(sc, args, run_dir, i)
        add_ratios(rows)
        print(f"\n== results ({time.monotonic() - t0:.0f}s; cores: {os.cpu_count()}) ==")
        print("x none / x noop / x dkim-u: messages/s divided by those of no-milter, of the no-op on the same "
              "socket type, of OpenDKIM over unix: (same size and sessions).\n+p50/+p99: client-side ms per "
              "message over one session, minus the no-milter p50 of the same size. cpu, rss: the milter process.")
        print(table(rows))
        checked = targets(rows)
        if checked:
            print("\n== issue 5 targets ==")
            for what, holds, figures in checked:
                print(f"  {'HOLDS' if holds else 'FAILS':<6} {what}: {figures}")
            print("  (RSS flat 10k->100k: run with --soak 100000)")
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, args.out / "results.csv")
        print(f"\nwrote {args.out / 'results.csv'}")
        if not args.quick:
            write_chart(rows, args.out / "chart.png", args.sessions, args.sizes)
            print(f"wrote {args.out / 'chart.png'}")
        return 0
    finally:
        if args.keep:
            print(f"kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
