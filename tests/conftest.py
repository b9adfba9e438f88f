"""Shared fixtures: configurations written to a temp dir, apps that are closed after use."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import pytest
import yaml

from mjfilter.app import App
from mjfilter.config import load_config
from mjfilter.dialects import is_control_header

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


def eml(name: str) -> bytes:
    return (DATA / name).read_bytes()


def without_control_headers(header_block: bytes) -> bytes:
    """A CRLF header block with every control header line (and its continuation lines) removed.

    Written independently of the headers plugin: the expected result of stripping.
    """
    kept: list[bytes] = []
    dropping = False
    for line in header_block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = is_control_header(line.split(b":", 1)[0].decode())
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a configuration (state in tmp_path) and return its path."""

    def write(chain: list[dict[str, Any]] | None = None, name: str = "mjfilter.yaml", **top: Any) -> Path:
        doc: dict[str, Any] = {"state_dir": str(tmp_path / "state"), "chain": chain or []}
        doc.update(top)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    return write


@pytest.fixture
def make_app(write_config: Callable[..., Path]) -> Iterator[Callable[..., App]]:
    """Build a started App from a chain; every app made is closed at the end."""
    apps: list[App] = []

    def make(chain: list[dict[str, Any]] | None = None, **top: Any) -> App:
        app = App(load_config(write_config(chain, **top)))
        app.start()
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()
