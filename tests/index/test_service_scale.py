"""`kvevents index` at fleet scale: 2,048 registered sources (worker x dp rank, each with a
replay endpoint) on one process, a live worker still indexed; limits answered as a JSON 503
that names them, never a plain-text 500 with a traceback (the old service ran out of ZeroMQ
sockets at about 255 sources)."""

from __future__ import annotations

import random
import resource
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from kvevents import vllm
from tests.index.test_service import BS, Server, chain, publish, stored
from tests.support import ROOT, wait_until

pytest.importorskip("uvicorn", reason="the index service needs kvevents[index]")
from kvevents_apps.indexd import IndexService  # noqa: E402

LOOPBACK = "tcp://127.0.0.1:0"
SOURCES = 2048
PUBLISHERS = 8


def register(server: Server, number: int, pub: Any) -> tuple[int, Any]:
    body = {
        "instance_id": number // 8,
        "dp_rank": number % 8,
        "endpoint": pub.connect_endpoint,
        "replay_endpoint": pub.connect_replay_endpoint,
        "model_name": "m",
        "block_size": BS,
    }
    return server.call("POST", "/register", body)


def test_2048_sources_on_one_index_and_a_live_worker_still_indexed(publishers) -> None:
    pubs = [
        vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=64) for _ in range(PUBLISHERS)
    ]
    publishers.extend(pubs)
    server = Server(IndexService())
    try:
        started = time.monotonic()
        for number in range(SOURCES):
            status, answer = register(server, number, pubs[number % PUBLISHERS])
            assert status == 201, (number, answer)
        took = time.monotonic() - started
        status, workers = server.call("GET", "/workers")
        assert sum(len(w["listeners"]) for w in workers) == SOURCES
        cpu = time.process_time()
        idle = time.monotonic()
        time.sleep(2)
        cores = (time.process_time() - cpu) / (time.monotonic() - idle)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(
            f"{SOURCES} sources registered in {took:.1f} s; idle: {cores:.2f} cores, max RSS {rss} MB"
        )
        tokens, hashes = chain(random.Random(1), 2)
        publish(pubs[3], stored(hashes, tokens))
        expected = {str(n // 8): {str(n % 8): 2 * BS} for n in range(3, SOURCES, PUBLISHERS)}

        def indexed() -> bool:
            status, body = server.call("POST", "/query", {"token_ids": tokens, "model_name": "m"})
            return status == 200 and body["scores"] == expected

        assert wait_until(indexed, 20)
    finally:
        server.close()


def test_the_source_limit_is_a_json_503_that_names_it(publishers) -> None:
    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=8)
    publishers.append(pub)
    server = Server(IndexService(max_sources=3))
    try:
        for number in range(3):
            assert register(server, number, pub)[0] == 201
        status, answer = register(server, 3, pub)
        assert status == 503 and "max_sources 3" in answer["error"], answer
    finally:
        server.close()


CHILD = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))
    from kvevents import vllm
    from kvevents_apps.indexd import IndexService
    from tests.index.test_service import BS, Server

    pub = vllm.ZmqEventPublisher(0, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", buffer_steps=8)
    server = Server(IndexService())
    for number in range(200):
        status, answer = server.call("POST", "/register", {
            "instance_id": number, "endpoint": pub.connect_endpoint,
            "replay_endpoint": pub.connect_replay_endpoint, "model_name": "m", "block_size": BS,
        })
        if status != 201:
            print(status, answer["error"])
            break
    status, answer = server.call("GET", "/health")
    print("health", status)
    server.close()
    pub.shutdown()
    """
)


def test_running_out_of_open_files_is_a_json_503_and_the_service_stays_up() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 2, (done.stdout, done.stderr[-2000:])
    assert lines[0].startswith("503 cannot follow another source") and "open files" in lines[0]
    assert lines[1] == "health 200"
