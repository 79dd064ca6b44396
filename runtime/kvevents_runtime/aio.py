"""An asyncio face of the subscriber, with its contract unchanged: the same core runs on one
dedicated worker thread (ZeroMQ sockets must stay on one thread at a time), and the event
loop awaits its polls. Nothing of the stream logic is written twice."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .security import CurveClient
from .subscriber import Delivery, Source, Subscriber


class AsyncSubscriber:
    """`async for delivery in sub` or `await sub.poll()`; `on_notice` runs on the worker
    thread (keep it short, or hand notices to the loop with `loop.call_soon_threadsafe`)."""

    core: type[Subscriber]
    """The subscriber class bound to a wire, set by the generated face."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvevents-subscriber")
        self._sub = self._executor.submit(self.core, *args, **kwargs).result()
        self._unread: deque[Delivery] = deque()
        """Deliveries an `async for` polled but never handed out (it broke, raised or was
        cancelled): the next poll or loop returns them first."""
        self._polling: Future[list[Delivery]] | None = None
        """A poll whose awaiting task was cancelled: it still runs on the worker thread, and
        its deliveries go to the next poll instead of nowhere."""

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        self._sub.interrupt()  # a poll waiting on the worker thread makes way at once
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def poll(self, timeout: float | None = 1.0, max_messages: int = 32) -> list[Delivery]:
        """As `Subscriber.poll`, awaited. Cancelling the awaiting task loses nothing: the poll
        finishes on the worker thread and the next call returns what it got."""
        if self._unread:
            unread = list(self._unread)
            self._unread.clear()
            return unread
        polling = self._polling
        if polling is None:
            polling = self._polling = self._executor.submit(self._sub.poll, timeout, max_messages)
        try:
            # shield: a cancelled caller must not cancel the poll that may already hold data.
            deliveries = await asyncio.shield(asyncio.wrap_future(polling))
        except asyncio.CancelledError:
            if polling.cancelled():  # cancelled before it ran: nothing was read
                self._polling = None
            raise
        except BaseException:
            self._polling = None
            raise
        self._polling = None
        return deliveries

    async def __aiter__(self) -> AsyncIterator[Delivery]:
        """Deliveries one at a time until closed (also by `close()` from another task). A
        loop that stops leaves what it was not handed for the next poll or loop."""
        unread = self._unread
        while not self.closed:
            if not unread:
                try:
                    unread.extend(await self.poll(0.2))
                except RuntimeError:
                    if self.closed:
                        return  # closed by another task while this one waited
                    raise
            while unread:
                yield unread.popleft()

    async def add_source(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str | None | bytes = b"",
        curve: CurveClient | None = None,
    ) -> Source:
        return await self._run(self._sub.add_source, endpoint, replay_endpoint, topic, curve)  # type: ignore[no-any-return]

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
        self._sub.interrupt()  # a poll(None) in progress returns within a tick
        await self._run(self._sub.close)
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
