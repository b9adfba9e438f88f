"""Run a real `mjfilter run` daemon for the integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from rig import free_port, wait_port, wait_unix


class Daemon:
    """`python -m mjfilter run -c CONF` in its own process group, logging to a file."""

    def __init__(self, base: Path, chain: list[dict[str, Any]], reinject_port: int | None = None,
                 port: int | None = None, **top: Any) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.reinject_port = reinject_port or free_port()
        self.conf = self.base / "mjfilter.yaml"
        self.log_path = self.base / "mjfilter.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.write(chain, **top)

    @property
    def listen(self) -> str:
        """What the configuration says (inet on a free port unless a test set milter.listen)."""
        return getattr(self, "_listen", f"inet:127.0.0.1:{self.port}")

    def write(self, chain: list[dict[str, Any]] | str, **top: Any) -> None:
        """Write the configuration (a chain, or the raw text of a whole file)."""
        if isinstance(chain, str):
            self.conf.write_text(chain)
            return
        doc: dict[str, Any] = {
            "state_dir": str(self.base / "state"),
            "milter": {"listen": self.listen},
            "reinject": {"host": "127.0.0.1", "port": self.reinject_port},
            "logging": {"level": "info"},
            "chain": chain,
        }
        for key, value in top.items():  # merge one level deep: milter={...} keeps listen
            if isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key] = {**doc[key], **value}
            else:
                doc[key] = value
        self._listen = doc["milter"]["listen"]
        self.conf.write_text(yaml.safe_dump(doc, sort_keys=False))

    def mjfilter(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mjfilter", *args, "-c", str(self.conf)],
                              capture_output=True, text=True, timeout=60)

    def postfix_config(self, part: str) -> str:
        r = self.mjfilter("postfix-config", f"--{part}")
        assert r.returncode == 0, r.stderr
        return r.stdout

    def start(self, timeout: float = 20.0) -> "Daemon":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mjfilter", "run", "-c", str(self.conf)],
                                     stdout=log, stderr=log, start_new_session=True)
        log.close()
        try:
            deadline = time.monotonic() + timeout
            while "ready" not in self.log():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mjfilter run exited with {self.proc.returncode}:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"mjfilter did not become ready:\n{self.log()}")
                time.sleep(0.05)
            if self.listen.startswith("unix:"):
                wait_unix(self.listen[len("unix:"):], timeout=timeout)
            else:
                wait_port("127.0.0.1", self.port, timeout=timeout)
        except BaseException:
            self.stop(timeout=5)  # never leave a daemon behind a failed start
            raise
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def world_main_cf(daemon: Daemon, *others: Daemon) -> dict[str, str]:
    """main.cf for a rig from `mjfilter postfix-config`, keeping the rig's short milter timeouts.

    ``others`` are further milters run after ``daemon`` (smtpd_milters is a list).
    """
    main = postfix_main_cf(daemon.postfix_config("main"))
    main["disable_mime_output_conversion"] = "yes"  # compare 8-bit bodies byte for byte
    for k in ("milter_connect_timeout", "milter_command_timeout", "milter_content_timeout"):
        main.pop(k)
    if others:
        main["smtpd_milters"] = ", ".join([main["smtpd_milters"], *(o.listen for o in others)])
    return main


def postfix_main_cf(text: str) -> dict[str, str]:
    """Parse `mjfilter postfix-config --main` output into parameters."""
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition(" = ")
            out[k.strip()] = v.strip()
    return out
