"""Shared checks for relay-map sources (SQL, LDAP): lookups from several threads at once."""

from __future__ import annotations

import threading
from collections.abc import Callable


def assert_concurrent_lookups(lookup: Callable[[str], str | None], expected: dict[str, str | None],
                              threads: int = 8, rounds: int = 60) -> None:
    """``threads`` threads start together and each make ``rounds`` lookups over ``expected``'s
    keys; every answer must be the expected one, and no thread may fail or hang."""
    keys = list(expected)
    errors: list[BaseException] = []
    wrong: list[tuple[str, str | None]] = []
    start = threading.Barrier(threads)

    def worker(n: int) -> None:
        try:
            start.wait(10)
            for j in range(rounds):
                key = keys[(n * 7 + j) % len(keys)]
                got = lookup(key)
                if got != expected[key]:
                    wrong.append((key, got))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(30)
    assert not any(t.is_alive() for t in pool)
    assert not errors, errors
    assert not wrong, wrong[:5]
