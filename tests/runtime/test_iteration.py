"""Iteration loses nothing: a loop over the subscriber that stops (break, an exception, a
cancelled task) leaves what it was not handed for the next loop or poll, and close() from
another task ends an `async for` quietly. Real publishers and sockets on loopback."""

from __future__ import annotations

import asyncio
import random
import time

from hypothesis import given, settings
from hypothesis import strategies as st

import kvevents
from kvevents import vllm

LOOPBACK = "tcp://127.0.0.1:0"
TOTAL = 300


def _batch(n: int) -> vllm.KVEventBatch:
    return vllm.KVEventBatch(ts=float(n), events=[vllm.BlockRemoved(block_hashes=[n], medium=None)])


def _publisher(publishers) -> vllm.ZmqEventPublisher:
    publisher = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK)
    publishers.append(publisher)
    for n in range(TOTAL):
        publisher.publish(_batch(n))
    return publisher


def _assert_whole(got: list, stats: dict[str, int]) -> None:
    assert [d.seq for d in got] == list(range(TOTAL)), "a delivery vanished or came twice"
    assert [d.batch.ts for d in got] == [float(n) for n in range(TOTAL)]
    assert stats["history_lost"] == 0


def test_breaking_out_of_a_loop_loses_nothing(publishers) -> None:
    publisher = _publisher(publishers)
    got: list = []
    with kvevents.Subscriber(publisher.connect_endpoint, publisher.connect_replay_endpoint) as sub:
        deadline = time.monotonic() + 20
        while len(got) < TOTAL and time.monotonic() < deadline:
            for delivery in sub:
                got.append(delivery)
                if len(got) % 7 == 0 or len(got) == TOTAL:
                    break  # far fewer than one poll's 32
        stats = dict(sub.stats)
    _assert_whole(got, stats)


def test_an_exception_in_the_loop_body_loses_nothing_and_poll_returns_the_rest(
    publishers,
) -> None:
    publisher = _publisher(publishers)
    got: list = []
    with kvevents.Subscriber(publisher.connect_endpoint, publisher.connect_replay_endpoint) as sub:
        deadline = time.monotonic() + 20
        while len(got) < TOTAL and time.monotonic() < deadline:
            try:
                for delivery in sub:
                    got.append(delivery)
                    if len(got) % 5 == 0:
                        raise ValueError("the consumer's own bug")
            except ValueError:
                got += sub.poll(0)  # what the loop was not handed comes first
        stats = dict(sub.stats)
    _assert_whole(got, stats)


def test_a_cancelled_async_for_loses_nothing(publishers) -> None:
    """Tasks reading with `async for` are cancelled at random moments, most of them while
    awaiting a poll on the worker thread: its deliveries go to the next reader."""
    publisher = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK)
    publishers.append(publisher)
    rng = random.Random(7)

    async def main() -> tuple[list, dict[str, int]]:
        got: list = []
        async with kvevents.aio.Subscriber(
            publisher.connect_endpoint, publisher.connect_replay_endpoint
        ) as sub:

            async def read() -> None:
                async for delivery in sub:
                    got.append(delivery)

            published = 0
            deadline = time.monotonic() + 30
            while len(got) < TOTAL and time.monotonic() < deadline:
                for _ in range(min(10, TOTAL - published)):
                    publisher.publish(_batch(published))
                    published += 1
                reader = asyncio.create_task(read())
                await asyncio.sleep(rng.uniform(0, 0.01))
                reader.cancel()
                try:
                    await reader
                except asyncio.CancelledError:
                    pass
            stats = sub.stats
        return got, stats

    got, stats = asyncio.run(main())
    _assert_whole(got, stats)


def test_breaking_out_of_an_async_for_loses_nothing(publishers) -> None:
    publisher = _publisher(publishers)

    async def main() -> tuple[list, dict[str, int]]:
        got: list = []
        async with kvevents.aio.Subscriber(
            publisher.connect_endpoint, publisher.connect_replay_endpoint
        ) as sub:
            deadline = time.monotonic() + 20
            while len(got) < TOTAL and time.monotonic() < deadline:
                async for delivery in sub:
                    got.append(delivery)
                    if len(got) % 7 == 0 or len(got) == TOTAL:
                        break
            stats = sub.stats
        return got, stats

    got, stats = asyncio.run(main())
    _assert_whole(got, stats)


def test_close_from_another_task_ends_an_async_for_quietly(publishers) -> None:
    publisher = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK)
    publishers.append(publisher)

    async def one_round(delay: float) -> None:
        sub = kvevents.aio.Subscriber(
            publisher.connect_endpoint,
            publisher.connect_replay_endpoint,
            idle_probe=None,
            stale_after=None,
        )

        async def read() -> None:
            async for _ in sub:
                pass

        reader = asyncio.create_task(read())
        await asyncio.sleep(delay)
        await sub.close()
        await asyncio.wait_for(reader, 10)  # raised RuntimeError: Subscriber is closed

    async def main() -> None:
        for delay in [0.0, 0.001, 0.01, 0.05, 0.2] * 2:
            await one_round(delay)

    asyncio.run(main())


def test_a_long_poll_still_runs_the_clocks(publishers) -> None:
    """A long `poll` used to hold back the idle probe and the `stale` notice until it
    returned: a source that went silent was reported only when the caller's wait ended."""
    publisher = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK)
    publishers.append(publisher)
    publisher.publish(_batch(0))
    stale_at: list[float] = []

    def on_notice(notice: kvevents.Notice) -> None:
        if notice.kind == "stale":
            stale_at.append(time.monotonic())

    with kvevents.Subscriber(
        publisher.connect_endpoint,
        publisher.connect_replay_endpoint,
        idle_probe=None,
        stale_after=0.5,
        on_notice=on_notice,
    ) as sub:
        deadline = time.monotonic() + 10
        while sub.stats["delivered"] < 1 and time.monotonic() < deadline:
            sub.poll(0.1)
        started = time.monotonic()
        while time.monotonic() - started < 3:
            assert sub.poll(4.0) == []  # it may return early on a socket event, never late
    assert stale_at and stale_at[0] - started < 2.0, (stale_at, started)


def test_close_from_another_task_ends_a_poll_that_waits_forever(publishers) -> None:
    """`await sub.close()` did not return while a `poll(None)` waited on the worker thread."""
    publisher = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK)
    publishers.append(publisher)

    async def scenario() -> None:
        sub = kvevents.aio.Subscriber(
            publisher.connect_endpoint,
            publisher.connect_replay_endpoint,
            idle_probe=None,
            stale_after=None,
        )
        for _ in range(3):
            await sub.poll(0.3)  # joined: nothing is in flight any more
        waiting = asyncio.create_task(sub.poll(None))
        await asyncio.sleep(0.3)
        await asyncio.wait_for(sub.close(), 5)
        assert await asyncio.wait_for(waiting, 5) == []

    asyncio.run(scenario())


STOPS = ["break", "raise", "close generator", "poll"]


@settings(max_examples=25, deadline=None, database=None)
@given(
    schedule=st.lists(
        st.tuples(st.integers(1, 40), st.sampled_from(STOPS)), min_size=1, max_size=30
    )
)
def test_iteration_stopped_any_way_at_any_point_loses_nothing(schedule: list) -> None:
    """Randomized: each round takes `n` deliveries and stops (break, an exception in the body,
    the generator closed, or a plain poll), then the next round goes on; together they are
    every seq once, in order."""
    publisher = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK)
    try:
        for n in range(TOTAL):
            publisher.publish(_batch(n))
        got: list = []
        with kvevents.Subscriber(
            publisher.connect_endpoint, publisher.connect_replay_endpoint
        ) as sub:
            deadline = time.monotonic() + 20
            rounds = iter(schedule * (TOTAL // len(schedule) + 1))
            while len(got) < TOTAL and time.monotonic() < deadline:
                take, how = next(rounds, (TOTAL, "break"))
                if how == "poll":
                    got += sub.poll(0.05)
                    continue
                loop = iter(sub)
                try:
                    for delivery in loop:
                        got.append(delivery)
                        if len(got) % take == 0 or len(got) == TOTAL:
                            if how == "raise":
                                raise LookupError("the consumer's own bug")
                            if how == "close generator":
                                loop.close()  # type: ignore[attr-defined]
                            break
                except LookupError:
                    pass
            stats = dict(sub.stats)
        _assert_whole(got, stats)
    finally:
        publisher.shutdown()
