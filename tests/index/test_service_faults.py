"""`kvevents index` under faults: a failure is never silent (logged, counted, stale in the
answers, healed, or reported by /health); one poll for every model; topics; bounds and
errors on every request. Real HTTP and real ZeroMQ throughout; faults are injected into
kvevents' own code only (a defect is what they stand for)."""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import threading
import time
from typing import Any

import pytest

from kvevents import vllm
from kvevents_runtime.prefix import PrefixIndex
from tests.index.test_service import BS, Server, chain, publish, score, service, stored
from tests.support import wait_until

pytest.importorskip("uvicorn", reason="the index service needs kvevents[index]")

__all__ = ["service"]  # the fixture, shared with test_service
LOOPBACK = "tcp://127.0.0.1:0"


def register(server: Server, worker: int, pub: Any, model: str = "m", **extra: Any) -> int:
    body = {
        "instance_id": worker,
        "endpoint": pub.connect_endpoint,
        "replay_endpoint": pub.connect_replay_endpoint,
        "model_name": model,
        "block_size": BS,
        **extra,
    }
    return server.call("POST", "/register", body)[0]


def one_worker_indexed(
    server: Server, publishers: list, seed: int, blocks: int
) -> tuple[Any, random.Random, list[int]]:
    """Worker 1 registered with a publisher of its own, one chain of `blocks` stored and
    seen in /query; returns the publisher, the random source and the chain's tokens."""
    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=64)
    publishers.append(pub)
    rng = random.Random(seed)
    tokens, hashes = chain(rng, blocks)
    assert register(server, 1, pub) == 201
    publish(pub, stored(hashes, tokens))
    assert wait_until(lambda: score(server, tokens) == {"1": {"0": blocks * BS}}, 10)
    return pub, rng, tokens


def test_a_batch_that_cannot_be_applied_is_logged_counted_stale_and_healed(
    service, publishers, monkeypatch, caplog
) -> None:
    """The old feeder task ended on any exception but RuntimeError (and on that one, quietly):
    the service went on answering from frozen state, `stale: false`, /health 200."""
    server = service()
    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=64, snapshots=True)
    publishers.append(pub)
    rng = random.Random(1)
    tokens, hashes = chain(rng, 3)
    assert register(server, 1, pub) == 201
    real_apply = PrefixIndex.apply
    failures = []

    def apply_failing_once(self: PrefixIndex, worker: Any, batch: Any) -> Any:
        if not failures:
            failures.append(worker)
            raise ValueError("an injected defect")
        return real_apply(self, worker, batch)

    monkeypatch.setattr(PrefixIndex, "apply", apply_failing_once)
    caplog.set_level(logging.ERROR, logger="kvevents.index")
    publish(pub, stored(hashes, tokens))
    # The worker's one batch failed: it is stale, and the snapshot it asks for heals it.
    assert wait_until(lambda: score(server, tokens) == {"1": {"0": 3 * BS}}, 10)
    assert failures == [(1, 0)]
    assert any("not applied" in r.message and r.exc_info for r in caplog.records)
    status, metrics = server.call("GET", "/metrics")
    labels = 'model_name="m",routing_group="default"} 1.0'
    assert f'kind="apply_failures",{labels}' in metrics, metrics
    assert f'kind="snapshots",{labels}' in metrics, metrics
    assert server.call("GET", "/health") == (200, {"status": "ok"})
    # The feed is alive: later batches are applied.
    more, more_hashes = chain(rng, 2)
    publish(pub, stored(more_hashes, more))
    assert wait_until(lambda: score(server, more) == {"1": {"0": 2 * BS}}, 10)


def test_a_feed_whose_polls_keep_failing_is_reported_by_health(
    service, publishers, monkeypatch
) -> None:
    """Every poll fails, a new subscriber's too: after unhealthy_after seconds /health says
    so, and every answer marks the worker stale; once polls work again, all is well."""
    server = service(unhealthy_after=0.5)
    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=64)
    publishers.append(pub)
    tokens, hashes = chain(random.Random(2), 2)
    assert register(server, 1, pub) == 201
    publish(pub, stored(hashes, tokens))
    assert wait_until(lambda: score(server, tokens) == {"1": {"0": 2 * BS}}, 10)
    feed = server.server.config.app.feed
    kind = type(feed.subscriber)
    real_poll = kind.poll
    broken = threading.Event()
    broken.set()

    async def poll(self: Any, *args: Any) -> Any:
        if broken.is_set():
            raise OSError("an injected failure of the poll")
        return await real_poll(self, *args)

    monkeypatch.setattr(kind, "poll", poll)
    assert wait_until(lambda: server.call("GET", "/health")[0] == 503, 10)
    status, answer = server.call("GET", "/health")
    assert answer["status"] == "unhealthy" and "injected failure" in answer["reason"], answer
    # Every answer now says the worker cannot be vouched for.
    status, body = server.call("POST", "/query", {"token_ids": tokens, "model_name": "m"})
    assert body["scores"] == {} and body["stale"] == {"1": {"0": 2 * BS}}, body
    status, metrics = server.call("GET", "/metrics")
    assert "kvevents_index_healthy 0.0" in metrics
    broken.clear()
    assert wait_until(lambda: server.call("GET", "/health")[0] == 200, 10)
    assert wait_until(lambda: score(server, tokens) == {"1": {"0": 2 * BS}}, 10)


def test_a_subscriber_that_keeps_failing_is_replaced(service, publishers) -> None:
    """A broken subscriber is replaced by a new one that follows every source again; the
    worker is whole again from its stream (seq 0 on), and later batches are applied."""
    server = service()
    pub, rng, tokens = one_worker_indexed(server, publishers, 7, 2)
    feed = server.server.config.app.feed

    async def poll(*args: Any) -> Any:
        raise OSError("an injected failure of this subscriber")

    broken = feed.subscriber
    broken.poll = poll  # this instance only: its replacement polls as usual
    assert wait_until(lambda: feed.rebuilds >= 1 and feed.subscriber is not broken, 10)
    assert wait_until(lambda: score(server, tokens) == {"1": {"0": 2 * BS}}, 10)
    more, more_hashes = chain(rng, 3)
    publish(pub, stored(more_hashes, more))
    assert wait_until(lambda: score(server, more) == {"1": {"0": 3 * BS}}, 10)
    assert server.call("GET", "/health") == (200, {"status": "ok"})


def test_one_poll_feeds_every_model(service, publishers) -> None:
    """Each new model used to add a polling thread that never went away."""
    server = service()
    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=64)
    publishers.append(pub)
    assert register(server, 0, pub, model="model-0") == 201
    before = threading.active_count()
    for number in range(1, 40):
        assert register(server, number, pub, model=f"model-{number}") == 201
    assert threading.active_count() - before <= 1
    tokens, hashes = chain(random.Random(3), 1)
    publish(pub, stored(hashes, tokens))

    def every_model_has_it() -> bool:
        return all(
            server.call("POST", "/query", {"token_ids": tokens, "model_name": f"model-{n}"})[1][
                "scores"
            ]
            == {str(n): {"0": BS}}
            for n in range(40)
        )

    assert wait_until(every_model_has_it, 15)


def test_register_without_a_topic_reads_every_topic(service, publishers) -> None:
    """Dynamo's /register has no topic and its indexer reads every topic; an engine set up
    with topic "kv-events" was never indexed while it kept publishing (its batches were
    dropped as another topic, and a source that keeps talking is never probed). An explicit
    topic reads that topic."""
    server = service()
    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=64, topic="kv-events")
    publishers.append(pub)
    assert register(server, 1, pub) == 201
    assert register(server, 2, pub, topic="kv-events") == 201
    rng = random.Random(4)
    tokens, hashes = chain(rng, 2)
    stop = threading.Event()

    def keep_publishing() -> None:
        publish(pub, stored(hashes, tokens))
        while not stop.wait(0.02):
            more, more_hashes = chain(rng, 1)
            publish(pub, stored(more_hashes, more))

    feeder = threading.Thread(target=keep_publishing)
    feeder.start()
    try:
        want = {"1": {"0": 2 * BS}, "2": {"0": 2 * BS}}
        assert wait_until(lambda: score(server, tokens) == want, 3), score(server, tokens)
    finally:
        stop.set()
        feeder.join(5)


def test_every_request_is_bounded_and_every_error_is_json(service) -> None:
    server = service(body_timeout=0.5)
    endpoint = "tcp://127.0.0.1:1"
    base = {"endpoint": endpoint, "model_name": "m", "block_size": BS}
    status, answer = server.call("POST", "/register", {**base, "instance_id": 1 << 64})
    assert status == 422 and "2^64" in answer["error"]
    status, answer = server.call(
        "POST", "/register", {**base, "instance_id": 1, "endpoint": "tcp://" + "a" * 1_000_000}
    )
    assert status == 422 and "length" in answer["error"], answer
    status, answer = server.call(
        "POST", "/register", {**base, "instance_id": 1, "topic": "t" * 300}
    )
    assert status == 422
    status, answer = server.call("POST", "/query", {"token_ids": [1] * ((1 << 20) + 1)})
    assert status == 422 and "length" in answer["error"]
    server.conn.request("DELETE", "/query")
    response = server.conn.getresponse()
    response.read()
    assert response.status == 405 and response.getheader("allow") == "POST"
    server.conn.request("PUT", "/metrics")
    response = server.conn.getresponse()
    response.read()
    assert response.status == 405 and response.getheader("allow") == "GET"
    # A body that never finishes arriving is answered 408 once its time is up.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        reply = raw.recv(4096)
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b'"error"' in reply and 0.4 < waited < 4, (reply, waited)


def test_dump_streams_what_the_index_holds(service, publishers) -> None:
    server = service()
    pubs = []
    rng = random.Random(5)
    expected = 0
    for worker in range(3):
        pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=64)
        publishers.append(pub)
        pubs.append(pub)
        assert register(server, worker, pub) == 201
    for _ in range(20):
        for pub in pubs:
            tokens, hashes = chain(rng, 2)
            publish(pub, stored(hashes, tokens))
            expected += 2

    def dumped() -> int:
        status, body = server.call("GET", "/dump")
        assert status == 200
        events = body["m:default"]["events"] if body else []
        return sum(len(e["event"]["data"]["stored"]["blocks"]) for e in events)

    assert wait_until(lambda: dumped() == expected, 10), dumped()
    status, body = server.call("GET", "/dump")
    ids = [e["event"]["event_id"] for e in body["m:default"]["events"]]
    assert ids == list(range(1, len(ids) + 1))
    assert {e["worker_id"] for e in body["m:default"]["events"]} == {0, 1, 2}


def test_workers_show_liveness_from_the_subscriber(service, publishers) -> None:
    """A worker that never answered (`tcp://no-such-host.invalid:1`) was listed `active`
    for minutes."""
    server = service()
    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=8)
    publishers.append(pub)
    assert register(server, 1, pub) == 201
    body = {
        "instance_id": 2,
        "endpoint": "tcp://no-such-host.invalid:1",
        "model_name": "m",
        "block_size": BS,
    }
    assert server.call("POST", "/register", body)[0] == 201
    publish(pub, stored(*reversed(chain(random.Random(6), 1))))

    def states() -> dict[int, Any]:
        status, workers = server.call("GET", "/workers")
        return {w["instance_id"]: w["listeners"]["0"] for w in workers}

    assert wait_until(lambda: states()[1]["status"] == "active", 10), states()
    listeners = states()
    assert (
        listeners[2]["status"] == "connecting" and listeners[2]["last_message_seconds_ago"] is None
    )
    assert listeners[1]["last_message_seconds_ago"] < 5
    status, metrics = server.call("GET", "/metrics")
    assert (
        'worker_id="2"} -1.0' in metrics and 'kvevents_index_limit{name="max_sources"}' in metrics
    )


def test_slow_headers_and_malformed_requests_get_json_answers() -> None:
    """uvicorn answered a request it could not parse in plain text, and held a connection
    whose headers never finished for ever (1,000 of them locked every client out)."""
    from kvevents_apps.indexd import IndexService

    server = Server(IndexService(), header_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"POST /query HTTP/1.1\r\nHost: x\r\nContent-")
            started = time.monotonic()
            reply = raw.recv(4096)
            waited = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408") and b'{"error":' in reply, reply
        assert 0.3 < waited < 4, waited
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            reply = raw.recv(4096)
        assert reply.startswith(b"HTTP/1.1 400") and b"application/json" in reply, reply
        assert b'{"error":"invalid HTTP request' in reply, reply
        # A client that keeps its connection and answers in time is served as before.
        assert server.call("GET", "/health") == (200, {"status": "ok"})
        time.sleep(0.8)  # idle past the header timeout between two requests: reconnects
        assert server.call("GET", "/health") == (200, {"status": "ok"})
    finally:
        server.close()


def test_connections_past_the_cap_are_refused_in_json_and_a_freed_slot_is_served() -> None:
    """There was no connection cap of the service's own (uvicorn's limit answered requests in
    plain text, and only once their headers came)."""
    from kvevents_apps.indexd import IndexService

    server = Server(IndexService(), max_connections=4)
    held: list[socket.socket] = []
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        for _ in range(4):  # four kept-alive connections, each served once
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            held.append(conn)
            conn.sendall(health)
            assert conn.recv(4096).startswith(b"HTTP/1.1 200"), "a connection under the cap"
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            reply = extra.recv(4096)  # answered at once, before it sends anything
        assert reply.startswith(b"HTTP/1.1 503") and b"application/json" in reply, reply
        assert b"over the limit of 4 open connections" in reply, reply
        held.pop().close()

        def served() -> bool:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
                conn.sendall(health)
                return conn.recv(4096).startswith(b"HTTP/1.1 200")

        assert wait_until(served, 10), "a freed slot was not served"
    finally:
        for conn in held:
            conn.close()
        server.close()


def test_short_queries_are_answered_while_long_ones_wait_their_turn(
    service, publishers, monkeypatch
) -> None:
    """Two clients sending 1M-token queries pushed another client's p99 from 4 to 198 ms:
    decoding and hashing ran on the one event loop. Long prompts are now decoded and hashed
    in a lane of their own (a process; a thread here, so the test can hold them), first come
    first served, with a bounded line: a short query is answered while long ones are held
    there, and past the line /query answers 503."""
    from concurrent.futures import ThreadPoolExecutor

    from kvevents_apps import indexd

    server = service()
    app = server.server.config.app
    app.large_lane_factory = lambda: ThreadPoolExecutor(1)
    pub, rng, tokens = one_worker_indexed(server, publishers, 3, 3)

    gate = threading.Event()
    real = indexd._parse_and_hash
    entered = threading.Semaphore(0)

    def held_until_released(body: bytes, block_sizes: Any) -> Any:
        entered.release()
        assert gate.wait(30), "the test never released the long queries"
        return real(body, block_sizes)

    monkeypatch.setattr(indexd, "_parse_and_hash", held_until_released)
    monkeypatch.setattr(indexd, "MAX_LARGE_QUERIES", 2)
    long_prompt = tokens + [rng.randrange(50_000) for _ in range(20_000)]
    answers: list[Any] = []

    body = json.dumps({"token_ids": long_prompt, "model_name": "m"}).encode()
    assert len(body) > indexd.LARGE_QUERY

    def long_query() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("POST", "/query", body=body)
            response = conn.getresponse()
            answers.append((response.status, json.loads(response.read())))
        finally:
            conn.close()

    clients = [threading.Thread(target=long_query) for _ in range(2)]
    try:
        for client in clients:
            client.start()
        assert entered.acquire(timeout=10), "no long query reached its thread"
        assert wait_until(lambda: app._large_queries == 2, 10), app._large_queries
        for _ in range(5):  # short queries go by while both long ones are held
            assert score(server, tokens) == {"1": {"0": 3 * BS}}
        assert not answers, answers
        status, body = server.call("POST", "/query", {"token_ids": long_prompt, "model_name": "m"})
        assert status == 503 and "large queries waiting" in body["error"], (status, body)
    finally:
        gate.set()
        for client in clients:
            client.join(30)
    assert [a[0] for a in answers] == [200, 200], answers
    assert all(a[1]["scores"] == {"1": {"0": 3 * BS}} for a in answers), answers


def test_long_queries_are_answered_from_the_large_query_process(service, publishers) -> None:
    """The lane the service really uses: a process, whose errors come back as the same JSON
    answers a short query gets, and which is started again if it dies."""
    import os
    import signal

    server = service()
    pub, rng, tokens = one_worker_indexed(server, publishers, 4, 3)
    long_prompt = tokens + [rng.randrange(50_000) for _ in range(20_000)]
    assert score(server, long_prompt) == {"1": {"0": 3 * BS}}
    status, body = server.call("POST", "/query", {"token_ids": long_prompt, "model_name": "x"})
    assert status == 404 and "no indexer for model=x" in body["error"], body
    status, body = server.call(
        "POST", "/query", {"token_ids": [*long_prompt, 1 << 32], "model_name": "m"}
    )
    assert status == 422 and "unsigned 32-bit" in body["error"], body
    lane = server.server.config.app._large_lane
    (pid,) = [process.pid for process in lane._processes.values()]
    os.kill(pid, signal.SIGKILL)
    answers = [server.call("POST", "/query", {"token_ids": long_prompt, "model_name": "m"})]
    if answers[0][0] == 503:  # the query that met the dead worker; the next starts a new one
        assert "worker died" in answers[0][1]["error"], answers
        answers.append(server.call("POST", "/query", {"token_ids": long_prompt, "model_name": "m"}))
    assert answers[-1][0] == 200, answers
    assert answers[-1][1]["scores"] == {"1": {"0": 3 * BS}}, answers


def _read_responses(raw: socket.socket, count: int, deadline: float) -> list[tuple[int, bytes]]:
    """`count` HTTP responses (status, body) read from one connection, in order."""
    buffer = b""
    out: list[tuple[int, bytes]] = []
    while len(out) < count:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buffer[:head_end].decode("latin-1").lower()
            length = next(
                (
                    int(line.split(":", 1)[1])
                    for line in head.split("\r\n")
                    if line.startswith("content-length:")
                ),
                None,
            )
            chunked = "transfer-encoding: chunked" in head
            body_start = head_end + 4
            if length is not None and len(buffer) >= body_start + length:
                out.append((int(head.split()[1]), buffer[body_start : body_start + length]))
                buffer = buffer[body_start + length :]
                continue
            if chunked and b"\r\n0\r\n\r\n" in buffer[body_start - 2 :]:
                end = buffer.index(b"\r\n0\r\n\r\n", body_start - 2) + 7
                out.append((int(head.split()[1]), _dechunk(buffer[body_start:end])))
                buffer = buffer[end:]
                continue
        raw.settimeout(max(0.01, deadline - time.monotonic()))
        data = raw.recv(65536)
        if not data:
            break
        buffer += data
    return out


def _dechunk(body: bytes) -> bytes:
    out, position = b"", 0
    while True:
        line_end = body.index(b"\r\n", position)
        size = int(body[position:line_end], 16)
        if not size:
            return out
        out += body[line_end + 2 : line_end + 2 + size]
        position = line_end + 4 + size


def test_the_query_fast_lane_keeps_http_order_keep_alive_and_close(service, publishers) -> None:
    """Short queries are answered by the protocol itself, without the ASGI cycle. Pipelined
    behind a request still on the ASGI path they must wait their turn (answers in request
    order); errors keep the connection; `Connection: close` and HTTP/1.0 close after the
    answer; and /metrics counts them."""
    server = service()
    _, _, tokens = one_worker_indexed(server, publishers, seed=41, blocks=4)
    query = json.dumps({"token_ids": tokens, "model_name": "m"}).encode()

    def post(path: str, body: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
        return b"POST %s HTTP/%s\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (
            path.encode(),
            version,
            len(body),
            extra,
            body,
        )

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        pipelined = (
            b"GET /dump HTTP/1.1\r\nHost: x\r\n\r\n"
            + post("/query", query)
            + post("/query", b"{not json")
            + post("/query", json.dumps({"token_ids": tokens, "model_name": "none"}).encode())
            + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            + post("/query", query)
        )
        raw.sendall(post("/query", query) + post("/query", query) + pipelined)
        answers = _read_responses(raw, 8, time.monotonic() + 10)
    for status, body in answers[:2]:
        assert status == 200 and json.loads(body)["scores"] == {"1": {"0": 4 * BS}}, body
    answers = answers[2:]
    statuses = [status for status, _ in answers]
    assert statuses == [200, 200, 400, 404, 200, 200], answers
    assert b'"events"' in answers[0][1], answers
    assert json.loads(answers[4][1]) == {"status": "ok"}, answers
    for _, body in (answers[1], answers[5]):
        assert json.loads(body)["scores"] == {"1": {"0": 4 * BS}}, body
    assert json.loads(answers[2][1])["error"].startswith("malformed JSON")

    for extra, version in ((b"Connection: close\r\n", b"1.1"), (b"", b"1.0")):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(post("/query", query, extra, version))
            answers = _read_responses(raw, 1, time.monotonic() + 5)
            assert answers and answers[0][0] == 200, answers
            raw.settimeout(2)  # under the 5 s keep-alive, which would close it anyway
            started = time.monotonic()
            assert raw.recv(100) == b"", "the connection was kept open after the answer"
            assert time.monotonic() - started < 1, "closed by the keep-alive timeout only"

    status, metrics = server.call("GET", "/metrics")
    counted = {
        line.split('"')[1]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("kvevents_index_http_requests_total{")
    }
    assert counted["all"] >= 12 and counted["error"] >= 2, counted
