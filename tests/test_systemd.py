"""contrib/systemd/mjfilter.service: systemd accepts it, and its command lines are ones mjfilter accepts."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from mjfilter.cli import build_parser
from mjfilter.config import MilterConfig

UNIT = ROOT / "contrib" / "systemd" / "mjfilter.service"


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every line, in order (keys may repeat, as systemd allows)."""
    out, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in directives(UNIT.read_text()) if s == section and k == key]


def one(key: str, section: str = "Service") -> str:
    [v] = values(key, section)
    return v


def environment() -> dict[str, str]:
    env = {}
    for v in values("Environment"):
        for item in shlex.split(v):
            k, _, val = item.partition("=")
            env[k] = val
    return env


def command(key: str) -> list[str]:
    """The unit's command line with its ${VAR}s expanded from Environment= (prefixes like '-' dropped)."""
    env = environment()
    line = one(key).lstrip("-@:+!")
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w) for w in shlex.split(line)]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert m, f"unparsed time span {value!r}"
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


def test_execstart_runs_the_daemon_with_the_documented_configuration():
    argv = command("ExecStart")
    assert argv[0] == "/usr/local/bin/mjfilter"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.config == "/etc/mjfilter/mjfilter.yaml"
    assert environment()["MJFILTER_CONFIG"] == "/etc/mjfilter/mjfilter.yaml"


def test_execreload_uses_the_control_socket_not_sighup():
    argv = command("ExecReload")
    assert argv[0] == "/usr/local/bin/mjfilter"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "reload" and args.config == "/etc/mjfilter/mjfilter.yaml"
    assert "kill" not in one("ExecReload").lower() and "HUP" not in one("ExecReload")


def test_unknown_options_would_be_caught():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--no-such-option"])


def test_stop_and_restart_policy():
    assert one("Type") == "simple"
    assert one("KillSignal") == "SIGTERM"
    assert one("Restart") == "on-failure"
    drain = MilterConfig().drain_timeout
    assert seconds(one("TimeoutStopSec")) >= drain + 10  # the drain plus libmilter's own stop


def test_dedicated_user_and_state_directory():
    assert one("User") == "mjfilter" and one("Group") == "mjfilter"
    assert one("StateDirectory") == "mjfilter"
    rw = " ".join(values("ReadWritePaths")).split()
    assert "-/var/lib/mjfilter" in rw and any("postfix" in p for p in rw)
    readme = (UNIT.parent / "README.md").read_text()
    assert "useradd --system" in readme and "tracking" in readme


@pytest.mark.parametrize("key, value", [
    ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"), ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"), ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
    ("CapabilityBoundingSet", ""),
])
def test_sandboxing(key, value):
    assert one(key) == value


def test_system_call_filter():
    assert values("SystemCallFilter")[0] == "@system-service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # verify checks that ExecStart's program exists: point it at this installation's mjfilter
    exe = Path(sys.executable).parent / "mjfilter"
    assert exe.exists()
    unit = tmp_path / "mjfilter.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/mjfilter", str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    # verify exits 0 even when it ignores a bad line: any message about our file is a failure
    ours = [x for x in (r.stdout + r.stderr).splitlines() if "mjfilter" in x]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr
