"""bench/bench.py --quick runs end to end through a real Postfix and reports what it should."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(shutil.which("smtp-source") is None and not Path("/usr/sbin/smtp-source").exists(),
                       reason="postfix is not installed: run make test, which installs it"),
]

QUICK = ["no-milter", "noop-inet", "noop-unix", "mjfilter-default-inet", "mjfilter-default-unix"]


def test_bench_quick(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "cores: " in out
    header = next(line for line in out.splitlines() if line.startswith("scenario "))
    assert "msgs/s" in header and "x none" in header and "x noop" in header
    table = out[out.index(header):]
    for name in QUICK:
        assert f"\n{name} " in table, name
    with open(tmp_path / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["scenario"], r["sessions"]) for r in rows} == {(n, s) for n in QUICK for s in ("1", "2")}
    for row in rows:
        assert int(row["messages"]) == 30 and float(row["rate"]) > 0, row
        assert float(row["x_none"]) > 0, row
    assert not (tmp_path / "chart.png").exists()  # --quick draws no chart
