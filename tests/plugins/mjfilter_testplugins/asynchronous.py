"""``test-async``: an async mjfilter_message, resolved by the engine's event loop."""

import asyncio
import threading
from typing import Any

from mjfilter import hookimpl


@hookimpl
def mjfilter_capabilities(config: Any) -> list[str]:
    return ["add_header"]


@hookimpl
async def mjfilter_message(txn: Any, actions: Any, config: Any, app: Any) -> None:
    await asyncio.sleep(0.001)
    actions.add_header("X-Async", threading.current_thread().name)
