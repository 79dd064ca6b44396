"""One subscriber, one poll, for every `LiveIndex` of a process.

A router with many models keeps one index per model; giving each its own subscriber meant a
polling thread per model that never went away (200 models: 209 threads, 0.95 of a core
idle). The feed owns the one asyncio subscriber, polls it, and hands each delivery and
notice to the index that registered its source. A failure while applying is contained to the
index and worker it concerns (LiveIndex logs, counts and marks it stale); a failure of the
poll itself is counted here, logged with its traceback, and retried after a pause, and
`failing` says so until a poll succeeds again.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import zmq

from .errors import SourceLimitError
from .security import CurveClient
from .subscriber import Notice

if TYPE_CHECKING:
    from .liveindex import LiveIndex

logger = logging.getLogger("kvevents.index")

MAX_SOURCES = 4096
"""Sources one feed follows by default (Dynamo's scale test: 2,048 workers on one router)."""
SOCKETS_PER_SOURCE = 4
"""SUB, DEALER, and the SUB's monitor (a PAIR at each end)."""
FILES_PER_SOURCE = 6
"""A mailbox per socket and a TCP connection each for the SUB and the DEALER."""
POLL_WAIT = 0.5
"""How long one poll of `run` waits when nothing arrives. A poll returns as soon as anything
does, so this costs no latency; each poll looks at every socket (7 ms with 2,048 sources),
so fewer idle polls is most of an idle router's cost."""
RETRY_PAUSE = (0.05, 2.0)
"""The pause after a failed poll, doubling from the first to at most the second (seconds)."""
REBUILD_AFTER = 3
"""Failed polls in a row after which the subscriber is replaced by a new one."""


class IndexFeed:
    """`await feed.run()` as one task; indexes made with `LiveIndex(feed=feed)` share it."""

    subscriber_class: Any
    """The asyncio subscriber bound to a wire, set by the generated face (kvevents.index)."""

    def __init__(self, max_sources: int = MAX_SOURCES, **subscriber_options: Any) -> None:
        self.max_sources = max_sources
        self._notices: deque[Notice] = deque()
        options = {"idle_probe": 1.0, "stale_after": 10.0, **subscriber_options}
        options["on_notice"] = self._notices.append  # runs on the subscriber's thread
        self._context: zmq.Context[Any] | None = None
        if "context" not in options:
            # Its own context: the process-wide one allows 1,023 sockets, about 255 sources.
            self._context = options["context"] = zmq.Context()
            self._context.max_sockets = SOCKETS_PER_SOURCE * max_sources + 64
            _raise_open_file_limit(FILES_PER_SOURCE * max_sources + 1024)
        self._options = options
        self._sub = self.subscriber_class(sources=[], **options)
        self.rebuilds = 0
        self._owners: dict[int, LiveIndex] = {}
        """subscriber source index -> the index that registered it."""
        self._indexes: dict[int, tuple[LiveIndex, int]] = {}
        """id(index) -> (the index, how many sources it has here): each is healed per poll."""
        self._closed = False
        self.poll_failures = 0
        self.last_failure: str | None = None
        self.failing_since: float | None = None
        """Monotonic time of the first of the failed polls in a row, or None."""

    @property
    def subscriber(self) -> Any:
        return self._sub

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    async def add_source(
        self,
        owner: LiveIndex,
        endpoint: str,
        replay_endpoint: str | None,
        topic: str | None,
        curve: CurveClient | None = None,
    ) -> Any:
        if len(self._owners) >= self.max_sources:
            raise SourceLimitError(f"max_sources {self.max_sources} reached")
        source = await self._sub.add_source(endpoint, replay_endpoint, topic=topic, curve=curve)
        self._owners[source.index] = owner
        _, count = self._indexes.get(id(owner), (owner, 0))
        self._indexes[id(owner)] = (owner, count + 1)
        return source

    async def remove_source(self, source: Any) -> None:
        owner = self._owners.pop(source.index, None)
        if owner is not None:
            _, count = self._indexes[id(owner)]
            if count > 1:
                self._indexes[id(owner)] = (owner, count - 1)
            else:
                del self._indexes[id(owner)]  # an index with no sources left costs nothing
        await self._sub.remove_source(source)

    async def request_snapshot(self, source: Any) -> bool:
        return bool(await self._sub.request_snapshot(source))

    async def step(self, timeout: float = 0.05) -> int:
        """One poll, handed out; returns the batches applied."""
        deliveries = await self._sub.poll(timeout, 256)
        owners = self._owners
        notices = self._notices
        while notices:
            notice = notices.popleft()
            owner = owners.get(notice.source)
            if owner is not None:
                owner.take_notice(notice)
        by_owner: dict[int, tuple[LiveIndex, list[Any]]] = {}
        for delivery in deliveries:
            owner = owners.get(delivery.source)
            if owner is not None:  # None: unregistered while its batches were in flight
                by_owner.setdefault(id(owner), (owner, []))[1].append(delivery)
        applied = 0
        for owner, batch in by_owner.values():
            applied += owner.take_deliveries(batch)
        for owner, _ in list(self._indexes.values()):
            await owner.heal()
        return applied

    async def run(self) -> None:
        """Poll until `close()`. A failed poll is logged, counted and retried after a pause."""
        pause = RETRY_PAUSE[0]
        failures = 0
        while not self._closed:
            try:
                await self.step(POLL_WAIT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    return  # the subscriber was closed under a poll
                self.poll_failures += 1
                self.last_failure = f"{type(exc).__name__}: {exc}"
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                logger.exception("kvevents index: a poll of the subscriber failed; retrying")
                for owner, _ in list(self._indexes.values()):
                    owner.mark_all_stale(f"the feed failed: {self.last_failure}")
                failures += 1
                if failures % REBUILD_AFTER == 0:
                    await self._rebuild()
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_PAUSE[1])
                continue
            pause = RETRY_PAUSE[0]
            failures = 0
            self.failing_since = None

    async def _rebuild(self) -> None:
        """A subscriber whose polls keep failing is replaced: a new one follows every source
        again (each index is told its sources' new handles; every worker is stale until its
        stream or a snapshot makes it whole)."""
        logger.error("kvevents index: the subscriber keeps failing; following every source anew")
        self.rebuilds += 1
        old, self._sub = self._sub, self.subscriber_class(sources=[], **self._options)
        try:
            await old.close()
        except Exception:
            logger.exception("kvevents index: closing the failed subscriber")
        owners, self._owners = self._owners, {}
        for index, owner in owners.items():
            source = owner.source_by_index(index)
            if source is None:
                continue
            try:
                new = await self._sub.add_source(
                    source.endpoint, source.replay_endpoint, topic=source.topic, curve=source.curve
                )
            except Exception:
                logger.exception("kvevents index: source %s not followed again", source.endpoint)
                continue
            self._owners[new.index] = owner
            owner.resubscribed(index, new)

    async def close(self) -> None:
        """Idempotent."""
        self._closed = True
        await self._sub.close()
        if self._context is not None:
            self._context.term()  # every socket is closed; lingers are 100 ms at most
            self._context = None


def _raise_open_file_limit(wanted: int) -> None:
    """Lift the soft open-file limit toward `wanted`, within the hard one (many systems
    start processes at a soft 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            logger.warning("kvevents index: cannot raise the open-file limit to %d", target)
