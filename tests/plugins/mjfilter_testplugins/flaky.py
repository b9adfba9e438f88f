"""``test-flaky``: tempfails the first attempt of every message (by fingerprint), accepts retries.

Stands in for "a later milter that tempfails after mjfilter accepted" in the
dedup tests; keeps what it saw in the store, so it works across processes.
"""

from typing import Any

from mjfilter import hookimpl


@hookimpl
def mjfilter_message(txn: Any, actions: Any, config: Any, app: Any) -> None:
    key = f"test-flaky:{txn.fingerprint()}"
    if app.store.get(key) is None:
        app.store.put(key, "refused once")
        actions.tempfail("first attempt refused by test-flaky")
