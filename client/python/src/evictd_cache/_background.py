"""One task of a cache on the running asyncio loop (L1's subscriber, the
counters' publisher): started by the first call that needs it, cancelled
by `stop`."""

from __future__ import annotations

import asyncio
from typing import Optional


class Background:
    """Subclasses name the task and give its body, `_main`."""

    name = "evictd"

    def __init__(self) -> None:
        self._task: "Optional[asyncio.Task[None]]" = None

    def ensure_started(self) -> None:
        """Starts the task on the running loop, unless it runs already."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._main(), name=self.name)

    async def stop(self) -> None:
        """Cancels the task and waits for it to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _main(self) -> None:
        raise NotImplementedError
