"""`kvevents index` over real HTTP and real ZeroMQ: Dynamo's request shapes and status codes,
answers equal to what the engines were sent, resynchronisation by snapshot, and the
command line of the issue's "done when"."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import xxhash

from bench.impls import free_port
from kvevents import vllm
from kvevents.index import local_block_hashes
from tests.support import ROOT, wait_until

uvicorn = pytest.importorskip("uvicorn", reason="the index service needs kvevents[index]")
from kvevents_apps.indexd import IndexService, parse_workers, server_config  # noqa: E402

BS = 16


class Server:
    """The service on a random loopback port, on a thread of its own (its own event loop)."""

    def __init__(self, app: IndexService, **options: Any) -> None:
        config = server_config(app, host="127.0.0.1", port=0, log_level="error", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert wait_until(lambda: self.server.started, 10), "the service did not start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        try:
            self.conn.request(method, path, body=data)
            response = self.conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closed an idle keep-alive connection (5 s): a client reconnects.
            self.conn.close()
            self.conn.request(method, path, body=data)
            response = self.conn.getresponse()
        raw = response.read()
        ctype = response.getheader("content-type", "")
        return response.status, json.loads(raw) if "json" in ctype else raw.decode()

    def close(self) -> None:
        self.conn.close()
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def service():
    made: list[Server] = []

    def start(**options: Any) -> Server:
        server = Server(IndexService(subscriber_options={"idle_probe": 0.2}, **options))
        made.append(server)
        return server

    yield start
    for server in made:
        server.close()


def chain(rng: random.Random, blocks: int) -> tuple[list[int], list[int]]:
    tokens = [rng.randrange(150_000) for _ in range(blocks * BS)]
    hashes = [rng.getrandbits(64) for _ in range(blocks)]
    return tokens, hashes


def stored(hashes: list[int], tokens: list[int], parent: int | None = None) -> Any:
    return vllm.BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )


def publish(pub: Any, *events: Any) -> None:
    pub.publish(vllm.KVEventBatch(ts=time.time(), events=list(events)))


def register(server: Server, worker: int, pub: Any) -> None:
    body = {
        "instance_id": worker,
        "endpoint": pub.connect_endpoint,
        "replay_endpoint": pub.connect_replay_endpoint,
        "model_name": "m",
        "block_size": BS,
    }
    assert server.call("POST", "/register", body)[0] == 201


def score(server: Server, tokens: list[int]) -> dict[str, Any]:
    status, body = server.call("POST", "/query", {"token_ids": tokens, "model_name": "m"})
    assert status == 200, body
    return body["scores"]


def test_dynamo_request_shapes_and_status_codes(service, publishers) -> None:
    server = service()
    pub = vllm.ZmqEventPublisher(0, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    publishers.append(pub)
    register = {
        "instance_id": 7,
        "endpoint": pub.connect_endpoint,
        "replay_endpoint": pub.connect_replay_endpoint,
        "model_name": "m",
        "block_size": BS,
        "tenant_id": "ignored",
        "additionalsalt": "ignored",
    }
    assert server.call("POST", "/register", register) == (201, {"status": "ok"})
    assert server.call("POST", "/register", register) == (
        409,
        {"error": "instance 7 dp_rank 0 already registered"},
    )
    bad = {**register, "instance_id": 8, "endpoint": "bad"}
    assert server.call("POST", "/register", bad) == (
        400,
        {"error": "invalid ZMQ endpoint 'bad': missing scheme"},
    )
    bad_replay = {**register, "instance_id": 8, "replay_endpoint": "udp://127.0.0.1:1"}
    status, answer = server.call("POST", "/register", bad_replay)
    assert status == 400 and "udp://127.0.0.1:1" in answer["error"]
    assert server.call("GET", "/workers?model_name=m")[1][0]["instance_id"] == 7
    assert len(server.call("GET", "/workers?model_name=m")[1]) == 1
    rng = random.Random(1)
    tokens, hashes = chain(rng, 4)
    publish(pub, stored(hashes, tokens))
    assert wait_until(lambda: score(server, tokens) == {"7": {"0": 4 * BS}}, 10)
    status, body = server.call("POST", "/query", {"token_ids": tokens, "model_name": "m"})
    assert body["frequencies"] == [] and body["instances"]["7"] == {
        "longest_matched": 64,
        "gpu": 64,
        "cpu": 64,
        "disk": 64,
        "dp": {"0": 64},
    }
    dynamo_hashes = local_block_hashes(tokens, BS)
    signed = [h - (1 << 64) if h >= 1 << 63 else h for h in dynamo_hashes]
    assert server.call("POST", "/query_by_hash", {"block_hashes": signed, "model_name": "m"})[1][
        "scores"
    ] == {"7": {"0": 64}}
    assert (
        server.call(
            "POST", "/query_by_hash", {"block_hashes": signed, "model_name": "m", "cache_salt": "x"}
        )[0]
        == 400
    )
    assert server.call("POST", "/query", {"token_ids": tokens, "model_name": "nope"}) == (
        404,
        {"error": "no indexer for model=nope routing_group=default"},
    )
    assert server.call("POST", "/query", b'{"token_ids": [1, 2')[0] == 400
    assert server.call("POST", "/query", {"token_ids": [-1], "model_name": "m"})[0] == 422
    assert server.call("POST", "/query", b"x" * (8 * 1024 * 1024 + 1))[0] == 413
    status, workers = server.call("GET", "/workers?model_name=m")
    assert status == 200 and workers[0]["instance_id"] == 7
    assert workers[0]["endpoints"] == {"0": pub.connect_endpoint}
    status, dump = server.call("GET", "/dump")
    assert status == 200 and dump["m:default"]["block_size"] == BS
    assert len(dump["m:default"]["events"]) == 4
    assert server.call("GET", "/health") == (200, {"status": "ok"})
    status, metrics = server.call("GET", "/metrics")
    assert (
        status == 200
        and 'kvevents_index_entries{model_name="m",routing_group="default"} 4.0' in metrics
    )
    assert server.call("GET", "/nowhere")[0] == 404
    assert server.call("POST", "/unregister", {"instance_id": 7, "model_name": "m"}) == (
        200,
        {"status": "ok"},
    )
    assert score(server, tokens) == {}
    assert server.call("POST", "/unregister", {"instance_id": 7, "model_name": "m"})[0] == 404


def test_answers_equal_what_the_engines_were_sent(service, publishers) -> None:
    """Four workers share prefixes, store, evict leaves and interior blocks; every answer
    must be, per worker, the longest run of leading blocks it holds by the events sent."""
    server = service()
    rng = random.Random(2)
    pubs = []
    for worker in range(4):
        pub = vllm.ZmqEventPublisher(0, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
        publishers.append(pub)
        pubs.append(pub)
        register(server, worker, pub)
    prefixes = [chain(rng, 4) for _ in range(3)]
    held: list[dict[int, tuple[int, ...]]] = [{} for _ in pubs]
    """worker -> engine hash -> token path (tuple of token blocks) it holds."""
    sequences = []
    for n in range(40):
        worker = rng.randrange(len(pubs))
        p_tokens, p_hashes = prefixes[rng.randrange(len(prefixes))]
        s_tokens, s_hashes = chain(rng, rng.randint(1, 4))
        tokens, hashes = p_tokens + s_tokens, p_hashes + s_hashes
        publish(pubs[worker], stored(hashes, tokens))
        for i, h in enumerate(hashes):
            held[worker][h] = tuple(tokens[: (i + 1) * BS])
        sequences.append(tokens)
        if n % 5 == 4:
            victim = rng.choice(list(held[worker]))
            publish(pubs[worker], vllm.BlockRemoved(block_hashes=[victim], medium="GPU"))
            del held[worker][victim]

    def expected(tokens: list[int]) -> dict[str, dict[str, int]]:
        out = {}
        for worker, blocks in enumerate(held):
            paths = set(blocks.values())
            depth = 0
            while depth * BS < len(tokens) and tuple(tokens[: (depth + 1) * BS]) in paths:
                depth += 1
            if depth:
                out[str(worker)] = {"0": depth * BS}
        return out

    # Every answer, not the last sequence's alone: the last event sent may be a removal that
    # the last sequence does not touch (under load it arrived after that answer was right).
    def answered() -> bool:
        return all(score(server, tokens) == expected(tokens) for tokens in sequences)

    assert wait_until(answered, 10)
    for tokens in sequences:
        assert score(server, tokens) == expected(tokens)


def test_a_late_registration_heals_from_a_snapshot_and_an_upstream_one_is_stale(
    service, publishers
) -> None:
    server = service()
    rng = random.Random(3)
    healing = vllm.ZmqEventPublisher(
        0, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", buffer_steps=4, snapshots=True
    )
    plain = vllm.ZmqEventPublisher(0, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", buffer_steps=4)
    publishers.extend([healing, plain])
    first, first_hashes = chain(rng, 3)
    for pub in (healing, plain):
        publish(pub, stored(first_hashes, first))
        for _ in range(10):  # pushes the store out of the 4-batch replay buffer
            tokens, hashes = chain(rng, 1)
            publish(pub, stored(hashes, tokens))
    time.sleep(0.3)
    for worker, pub in enumerate((healing, plain)):
        register(server, worker, pub)
    assert wait_until(lambda: score(server, first) == {"0": {"0": 3 * BS}}, 10)

    def states() -> dict[int, str]:
        status, workers = server.call("GET", "/workers")
        return {w["instance_id"]: w["listeners"]["0"]["status"] for w in workers}

    # The upstream-style publisher lost history with no snapshot to heal it: stale, cleared.
    assert wait_until(lambda: states() == {0: "active", 1: "stale"}, 10), states()
    assert "1" not in score(server, first)
    status, metrics = server.call("GET", "/metrics")
    assert 'kind="snapshots"' in metrics and 'kind="lost_and_cleared"' in metrics


def test_parse_workers_takes_dynamos_syntax() -> None:
    assert parse_workers("1=tcp://h:5557,1:1=tcp://h:5558, 2=ipc:///tmp/x") == [
        (1, 0, "tcp://h:5557"),
        (1, 1, "tcp://h:5558"),
        (2, 0, "ipc:///tmp/x"),
    ]
    with pytest.raises(ValueError):
        parse_workers("1tcp://h:5557")
    with pytest.raises(ValueError):
        parse_workers("x=tcp://h:5557")


def test_the_command_serves_query_for_a_running_publisher(publishers) -> None:
    """`kvevents index --workers 1=tcp://... --replay 1=tcp://...`, as a process."""
    live, replay, http_port = free_port(), free_port(), free_port()
    pub = vllm.ZmqEventPublisher(0, f"tcp://127.0.0.1:{live}", f"tcp://127.0.0.1:{replay}")
    publishers.append(pub)
    tokens, hashes = chain(random.Random(4), 2)
    publish(pub, stored(hashes, tokens))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvevents",
            "index",
            "--port",
            str(http_port),
            "--workers",
            f"1=tcp://127.0.0.1:{live}",
            "--replay",
            f"1=tcp://127.0.0.1:{replay}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:

        def answered() -> bool:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=2)
                conn.request("POST", "/query", body=json.dumps({"token_ids": tokens}))
                body = json.loads(conn.getresponse().read())
                conn.close()
                return body["scores"] == {"1": {"0": 2 * BS}}
            except (OSError, ValueError, KeyError):
                return False

        assert wait_until(answered, 15, 0.1), process.stderr.read1(4096) if process.poll() else ""
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stdout:
            process.stdout.close()
        if process.stderr:
            process.stderr.close()


def test_dynamo_local_hash_is_xxh3_of_little_endian_u32() -> None:
    tokens = list(range(16))
    packed = b"".join(t.to_bytes(4, "little") for t in tokens)
    assert local_block_hashes(tokens, 16) == [xxhash.xxh3_64_intdigest(packed, 1337)]
