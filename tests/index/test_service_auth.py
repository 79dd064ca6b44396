"""The index API's bearer tokens over real HTTP: without a valid token nothing but /health
answers and nothing changes; a read token queries but cannot register or unregister."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from kvevents import vllm
from tests.support import wait_until

pytest.importorskip("uvicorn", reason="the index service needs kvevents[index]")
from kvevents_apps.apiauth import ApiTokens  # noqa: E402
from kvevents_apps.indexd import IndexService  # noqa: E402
from tests.index.test_service import Server, chain, publish, stored  # noqa: E402

ADMIN = "admin-token-0123456789abcdef"
READ = "read-token-0123456789abcdef"
LOOPBACK = "tcp://127.0.0.1:0"


def call(server: Server, method: str, path: str, body: Any = None, token: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        ctype = response.getheader("content-type", "")
        answer = json.loads(raw) if "json" in ctype else raw.decode()
        return response.status, answer, response.getheader("www-authenticate")
    finally:
        conn.close()


@pytest.fixture
def guarded(publishers):
    server = Server(
        IndexService(
            subscriber_options={"idle_probe": 0.2}, tokens=ApiTokens(admin=[ADMIN], read=[READ])
        )
    )
    publisher = vllm.ZmqEventPublisher(0, endpoint=LOOPBACK, replay_endpoint=LOOPBACK)
    publishers.append(publisher)
    yield server, publisher
    server.close()


def registration(publisher: Any) -> dict[str, Any]:
    return {
        "instance_id": 7,
        "endpoint": publisher.connect_endpoint,
        "replay_endpoint": publisher.connect_replay_endpoint,
        "model_name": "m",
        "block_size": 16,
    }


def test_without_a_valid_token_only_health_answers_and_nothing_changes(guarded) -> None:
    server, publisher = guarded
    for token in (None, "not-a-configured-token-at-all", ADMIN[:-1]):
        status, answer, challenge = call(
            server, "POST", "/register", registration(publisher), token
        )
        assert status == 401 and "bearer token" in answer["error"] and challenge
        for method, path in (("GET", "/workers"), ("GET", "/metrics"), ("GET", "/dump")):
            assert call(server, method, path, token=token)[0] == 401
        query = {"token_ids": list(range(32)), "model_name": "m"}
        assert call(server, "POST", "/query", query, token)[0] == 401  # the fast lane too
    assert call(server, "GET", "/health")[0] in (200, 503)
    status, workers, _ = call(server, "GET", "/workers", token=ADMIN)
    assert status == 200 and workers == []  # the refused registrations changed nothing
    assert server.server.config.app.refused >= 15


def test_a_read_token_queries_but_cannot_change_what_is_followed(guarded) -> None:
    server, publisher = guarded
    assert call(server, "POST", "/register", registration(publisher), READ)[:2] == (
        403,
        {"error": "a read-only token may not use /register"},
    )
    assert call(server, "POST", "/register", registration(publisher), ADMIN)[0] == 201
    tokens, hashes = chain(__import__("random").Random(1), 2)
    publish(publisher, stored(hashes, tokens))
    query = {"token_ids": tokens, "model_name": "m"}

    def matched() -> bool:
        status, answer, _ = call(server, "POST", "/query", query, READ)
        return status == 200 and bool(answer.get("scores"))

    assert wait_until(matched, 10), call(server, "POST", "/query", query, READ)
    unregister = {"instance_id": 7, "model_name": "m"}
    assert call(server, "POST", "/unregister", unregister, READ)[0] == 403
    status, workers, _ = call(server, "GET", "/workers", token=READ)
    assert status == 200 and [w["instance_id"] for w in workers] == [7]


def test_short_tokens_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        ApiTokens(admin=["short"])


def test_a_source_registered_with_its_curve_key_is_indexed_and_a_plain_one_is_not(
    tmp_path, publishers, monkeypatch
) -> None:
    import zmq.auth

    from kvevents_runtime import security

    server_public, server_secret = security.make_keys(tmp_path / "engine", "engine")
    client_public, client_secret = security.make_keys(tmp_path / "router", "router")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / client_public.name).write_bytes(client_public.read_bytes())
    monkeypatch.setenv(security.ENV_SERVER_SECRET, str(server_secret))
    monkeypatch.setenv(security.ENV_ALLOWED_CLIENTS, str(allowed))
    engine = vllm.ZmqEventPublisher(0, endpoint=LOOPBACK, replay_endpoint=LOOPBACK)
    publishers.append(engine)
    monkeypatch.delenv(security.ENV_SERVER_SECRET)
    monkeypatch.delenv(security.ENV_ALLOWED_CLIENTS)
    monkeypatch.setenv(security.ENV_CLIENT_SECRET, str(client_secret))
    key = zmq.auth.load_certificate(str(server_public))[0].decode()

    server = Server(IndexService(subscriber_options={"idle_probe": 0.2}))
    try:
        plain = dict(registration(engine), instance_id=1, model_name="plain")
        secure = dict(registration(engine), instance_id=2, curve_server_key=key)
        assert call(server, "POST", "/register", plain)[0] == 201
        assert call(server, "POST", "/register", secure)[0] == 201
        bad = dict(registration(engine), instance_id=3, curve_server_key="x" * 39)
        assert call(server, "POST", "/register", bad)[0] == 422
        tokens, hashes = chain(__import__("random").Random(2), 2)
        publish(engine, stored(hashes, tokens))

        def scores(model: str) -> dict:
            query = {"token_ids": tokens, "model_name": model}
            return call(server, "POST", "/query", query)[1].get("scores", {})

        assert wait_until(lambda: bool(scores("m")), 10), scores("m")
        assert scores("plain") == {}  # a plain client fails the CURVE handshake: nothing arrives
    finally:
        server.close()


def test_the_command_serves_https_with_tokens_from_the_environment(tmp_path) -> None:
    """`kvevents index --tls-cert --tls-key` as a process, its tokens from the environment:
    the API answers over TLS, 401 without the token, 200 with it; plain HTTP gets nothing."""
    import ssl

    trustme = pytest.importorskip(
        "trustme", reason="the TLS test makes its certificates with trustme"
    )
    from bench.impls import free_port
    from tests.support import start_command, stop_command

    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.cert_chain_pems[0].write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    port = free_port()
    process = start_command(
        *("index", "--port", str(port), "--tls-cert", str(cert_file), "--tls-key", str(key_file)),
        env={"KVEVENTS_INDEX_TOKENS": ADMIN},
    )

    def get(token: str | None) -> int:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=client_context)
        try:
            conn.request(
                "GET", "/workers", headers={"Authorization": f"Bearer {token}"} if token else {}
            )
            return conn.getresponse().status
        finally:
            conn.close()

    def up() -> bool:
        try:
            return get(ADMIN) == 200
        except OSError:
            return False

    try:
        assert wait_until(up, 20, 0.1), stop_command(process)
        assert get(None) == 401
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        with pytest.raises((OSError, http.client.HTTPException)):
            plain.request("GET", "/health")
            plain.getresponse()
        plain.close()
    finally:
        stop_command(process)
