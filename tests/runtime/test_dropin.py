"""What vLLM's and SGLang's engines rely on beyond the wire: config objects, advertised
endpoints, data-parallel ports, and the factories' handling of what they are given."""

from __future__ import annotations

import msgspec
import pydantic
import pytest

import kvevents
from kvevents import sglang, vllm


class EngineCoreReadyResponse(msgspec.Struct, array_like=True, omit_defaults=True):
    """The shape vLLM's engine sends its publisher config home in (a msgspec struct with an
    optional config field), encoded with an enc_hook as vLLM's MsgpackEncoder does."""

    data_parallel_rank: int
    kv_events_config: vllm.KVEventsConfig | None = None


def _refuse(obj: object) -> object:
    raise TypeError(f"vLLM's enc_hook has no rule for {type(obj).__name__}")


def test_the_publisher_config_survives_vllms_ready_response(publishers) -> None:
    publisher = vllm.ZmqEventPublisher(0, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", topic="kv")
    publishers.append(publisher)
    config = publisher.get_publisher_config()
    wire = msgspec.msgpack.Encoder(enc_hook=_refuse).encode(EngineCoreReadyResponse(0, config))
    back = msgspec.msgpack.Decoder(EngineCoreReadyResponse).decode(wire)
    assert back.kv_events_config == config
    assert back.kv_events_config.endpoint == publisher.endpoint and config.topic == "kv"


def test_configured_wildcards_are_kept_and_ephemeral_ports_resolved(
    publishers, monkeypatch
) -> None:
    config = vllm.KVEventsConfig(
        enable_kv_cache_events=True, endpoint="tcp://*:0", replay_endpoint="tcp://*:0"
    )
    monkeypatch.setattr(vllm, "get_ip", lambda: "127.0.0.1")
    publisher = vllm.EventPublisherFactory.create(config, 1)
    publishers.append(publisher)
    resolved = publisher.get_publisher_config()
    assert resolved.endpoint.startswith("tcp://127.0.0.1:") and not resolved.endpoint.endswith(":0")
    assert (
        resolved.replay_endpoint.startswith("tcp://127.0.0.1:")
        and resolved.replay_endpoint != resolved.endpoint
    )
    assert config.endpoint == "tcp://*:0"
    monkeypatch.setattr(vllm, "get_ip", lambda: "0.0.0.0")
    with pytest.raises(ValueError, match="VLLM_HOST_IP"):
        vllm.EventPublisherFactory.create(config, 0)


def test_get_ip_honours_vllm_host_ip(monkeypatch) -> None:
    monkeypatch.setenv("VLLM_HOST_IP", "10.1.2.3")
    assert vllm.get_ip() == "10.1.2.3"
    monkeypatch.delenv("VLLM_HOST_IP")
    assert vllm.get_ip()  # some address of this host, never empty


@pytest.mark.parametrize(
    ("live", "replay", "rank", "clash"),
    [
        ("tcp://*:5557", "tcp://*:5558", 1, "rank 1's live port 5558 is rank 0's replay port"),
        ("tcp://*:5558", "tcp://*:5557", 1, "rank 1's replay port 5558 is rank 0's live port"),
        ("tcp://*:6000", "tcp://*:6002", 3, "rank 3's live port 6003 is rank 1's replay port"),
        ("tcp://*:6000", "tcp://*:6000", 0, "share port 6000"),
    ],
)
def test_a_rank_whose_port_is_another_ranks_is_refused_before_binding(
    live, replay, rank, clash
) -> None:
    for module in (vllm, sglang):
        with pytest.raises(kvevents.EndpointError, match=clash) as refused:
            module.ZmqEventPublisher(rank, live, replay)
        assert "\n" not in str(refused.value) and "+r" in str(refused.value)


@pytest.mark.parametrize(
    ("live", "replay", "rank"),
    [("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", 3), ("tcp://127.0.0.1:0", None, 2)],
)
def test_ranks_that_cannot_collide_start(publishers, live, replay, rank) -> None:
    publishers.append(vllm.ZmqEventPublisher(rank, live, replay))


def test_spaced_base_ports_are_accepted_by_the_rule() -> None:
    from kvevents_runtime.endpoints import check_rank_ports

    for rank in range(4):
        check_rank_ports("tcp://*:5557", "tcp://*:5567", rank)
        check_rank_ports("tcp://10.0.0.1:5557", "tcp://10.0.0.2:5558", rank)  # other interfaces
    with pytest.raises(kvevents.EndpointError):
        check_rank_ports("tcp://*:5557", "tcp://*:5567", 10)


def test_unknown_keys_are_forbidden_by_vllm_and_ignored_by_sglang() -> None:
    with pytest.raises(pydantic.ValidationError, match="surprise"):
        vllm.KVEventsConfig.from_cli('{"enable_kv_cache_events": true, "surprise": 1}')
    config = sglang.KVEventsConfig.from_cli('{"publisher": "zmq", "enable_kv_cache_events": true}')
    assert config.publisher == "zmq" and not hasattr(config, "enable_kv_cache_events")
    assert sglang.KVEventsConfig().publisher == "null" and vllm.KVEventsConfig().publisher == "null"
    with pytest.raises(pydantic.ValidationError, match="'null' or 'zmq'"):
        vllm.KVEventsConfig(publisher="kafka")


def test_sglang_factory_takes_only_the_json_text(publishers) -> None:
    assert isinstance(sglang.EventPublisherFactory.create(None), sglang.NullEventPublisher)
    assert isinstance(
        sglang.EventPublisherFactory.create('{"publisher": "null"}'), sglang.NullEventPublisher
    )
    with pytest.raises(TypeError, match="JSON text"):
        sglang.EventPublisherFactory.create(sglang.KVEventsConfig(publisher="zmq"))
    with pytest.raises(ValueError, match="Unknown event publisher 'kafka'"):
        sglang.EventPublisherFactory.create('{"publisher": "kafka"}')
    publisher = sglang.EventPublisherFactory.create(
        '{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:0", "x": 1}'
    )
    publishers.append(publisher)
    assert isinstance(publisher, sglang.ZmqEventPublisher)


def test_the_end_marker_is_on_the_publisher_class() -> None:
    for module in (vllm, sglang, kvevents.legacy):
        assert (
            module.ZmqEventPublisher.END_SEQ
            == kvevents.frames.END_SEQ
            == (-1).to_bytes(8, "big", signed=True)
        )
