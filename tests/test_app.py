"""App-level services plugins get through ``app``."""

from __future__ import annotations

from mjfilter.app import App
from mjfilter.config import load_config


def test_secret_is_made_once_and_kept_in_the_store(write_config):
    path = write_config([])
    a = App(load_config(path))
    b = App(load_config(path))
    try:
        key = a.secret("tracking")
        assert len(key) == 64 and int(key, 16) >= 0
        assert a.secret("tracking") == key
        assert b.secret("tracking") == key  # another process on the same store gets the same one
        assert a.secret("other") != key
    finally:
        a.close()
        b.close()
