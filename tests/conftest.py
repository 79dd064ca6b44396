"""Fixtures with real ZeroMQ sockets on loopback (random ports) and ipc, closed with linger 0."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator

import pytest
import zmq


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-goldens", action="store_true", help="rewrite tests/goldens/ from the current code"
    )


@pytest.fixture
def update_goldens(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-goldens"))


@pytest.fixture
def ctx() -> zmq.Context:
    return zmq.Context.instance()


@pytest.fixture
def sockets(ctx: zmq.Context) -> Iterator[Callable[[int], zmq.Socket]]:
    """A socket factory; every socket it makes is closed with linger 0 after the test."""
    made: list[zmq.Socket] = []

    def make(kind: int) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close(linger=0)


@pytest.fixture
def publishers() -> Iterator[list]:
    """Publishers registered here are shut down after the test."""
    made: list = []
    yield made
    for publisher in made:
        publisher.shutdown()


@pytest.fixture
def ipc_endpoint() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="kvevents-")
    yield f"ipc://{directory}/pub-{uuid.uuid4().hex[:8]}"
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)
