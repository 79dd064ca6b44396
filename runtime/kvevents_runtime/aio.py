"""An asyncio face of the subscriber, with its contract unchanged: the same core runs on one
dedicated worker thread (ZeroMQ sockets must stay on one thread at a time), and the event
loop awaits its polls. Nothing of the stream logic is written twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .subscriber import Delivery, Source, Subscriber


class AsyncSubscriber:
    """`async for delivery in sub` or `await sub.poll()`; `on_notice` runs on the worker
    thread (keep it short, or hand notices to the loop with `loop.call_soon_threadsafe`)."""

    core: type[Subscriber]
    """The subscriber class bound to a wire, set by the generated face."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvevents-subscriber")
        self._sub = self._executor.submit(self.core, *args, **kwargs).result()

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def poll(self, timeout: float | None = 1.0, max_messages: int = 32) -> list[Delivery]:
        """As `Subscriber.poll`, awaited."""
        return await self._run(self._sub.poll, timeout, max_messages)  # type: ignore[no-any-return]

    async def __aiter__(self) -> AsyncIterator[Delivery]:
        while not self.closed:
            for delivery in await self.poll(0.2):
                yield delivery

    async def add_source(self, endpoint: str, replay_endpoint: str | None = None) -> Source:
        return await self._run(self._sub.add_source, endpoint, replay_endpoint)  # type: ignore[no-any-return]

    async def request_snapshot(self, source: Source | int) -> bool:
        return await self._run(self._sub.request_snapshot, source)  # type: ignore[no-any-return]

    async def remove_source(self, source: Source | int) -> None:
        await self._run(self._sub.remove_source, source)

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._sub.stats)

    @property
    def sources(self) -> list[Source]:
        return self._sub.sources

    @property
    def closed(self) -> bool:
        return self._sub.closed

    async def close(self) -> None:
        """Idempotent."""
        if self._sub.closed:
            return
        await self._run(self._sub.close)
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
