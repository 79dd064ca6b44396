"""The helper functions and classes that vLLM's and SGLang's own code import from their
kv-events modules, checked against the upstream module itself (loaded from its wheel at test
time, skipped with the reason when it cannot be fetched) on random inputs.

Invariant: for every input, kvevents' helper returns what upstream's returns, or both raise."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvevents.sglang as ours_sglang
import kvevents.vllm as ours_vllm
from bench.references import SGLANG, VLLM, ReferenceUnavailable, load

pytestmark = pytest.mark.interop


def upstream(reference):
    try:
        return load(reference)
    except ReferenceUnavailable as exc:
        pytest.skip(str(exc))


def outcome(function, *args, **kwargs):
    try:
        return ("value", function(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - the kind of failure is what is compared
        return ("raises", isinstance(exc, ValueError))


hosts = st.sampled_from(
    [
        "*",
        "0.0.0.0",
        "::",
        "[::]",
        "[::1]",
        "::1",
        "127.0.0.1",
        "host",
        "a:b",
        "",
        "[zz]",
        "[fe80::1]",
    ]
)
ports = st.one_of(
    st.integers(-5, 70_000).map(str),
    st.sampled_from(["", "+80", " 80", "80a", "0", "65535", "65536"]),
)
schemes = st.sampled_from(["tcp://", "tcp://", "ipc://", "inproc://", ""])
endpoints = st.one_of(
    st.none(), st.builds(lambda s, h, p: f"{s}{h}:{p}", schemes, hosts, ports), st.text(max_size=12)
)


@settings(max_examples=600, deadline=None)
@given(endpoint=endpoints)
def test_endpoint_parsers_match_sglang(endpoint):
    ref = upstream(SGLANG)
    for name in ("parse_tcp_port", "parse_advertisable_tcp", "parse_bindable_tcp"):
        assert outcome(getattr(ours_sglang, name), endpoint) == outcome(
            getattr(ref, name), endpoint
        ), name


@settings(max_examples=600, deadline=None)
@given(
    kv=endpoints,
    replay=endpoints,
    dp_size=st.integers(-1, 70),
    mode=st.one_of(st.none(), st.sampled_from(["", "off", "OFF", "auto", " Auto "]), endpoints),
)
def test_load_publisher_range_matches_sglang(kv, replay, dp_size, mode):
    ref = upstream(SGLANG)
    kwargs = {
        "kv_endpoint": kv,
        "replay_endpoint": replay,
        "dp_size": dp_size,
        "load_publish_endpoint": mode,
    }
    assert outcome(ours_sglang.resolve_load_pub_range, **kwargs) == outcome(
        ref.resolve_load_pub_range, **kwargs
    )


@settings(max_examples=300, deadline=None)
@given(
    extra=st.one_of(st.none(), st.text(max_size=8)),
    salt=st.one_of(st.none(), st.text(max_size=8)),
    block_hash=st.integers(-(2**63), 2**63 - 1),
    sizes=st.tuples(st.integers(0, 4), st.integers(0, 4), st.one_of(st.none(), st.integers(0, 4))),
)
def test_namespaced_hashes_and_rank_choice_match_sglang(extra, salt, block_hash, sizes):
    ref = upstream(SGLANG)
    seed = ours_sglang.kv_event_namespace_seed(extra_key=extra, cache_salt=salt)
    assert seed == ref.kv_event_namespace_seed(extra_key=extra, cache_salt=salt)
    assert ours_sglang.namespaced_block_hash(
        block_hash, namespace_seed=seed
    ) == ref.namespaced_block_hash(block_hash, namespace_seed=seed)
    assert ours_sglang.select_kv_publisher_dp_rank(*sizes) == ref.select_kv_publisher_dp_rank(
        *sizes
    )


@pytest.mark.parametrize(
    "config",
    [
        None,
        "",
        '{"publisher": "zmq"}',
        '{"format": "dynamo"}',
        '{"format": "default", "topic": "kv"}',
    ],
)
def test_dynamo_format_detection_matches_sglang(config):
    ref = upstream(SGLANG)
    assert ours_sglang.uses_dynamo_format(config) == ref.uses_dynamo_format(config)
    assert ours_sglang.LOAD_TOPIC == ref.LOAD_TOPIC
    assert ours_sglang.OffloadedState().__struct_fields__ == ref.OffloadedState().__struct_fields__


def test_a_bad_format_is_a_value_error_in_both():
    ref = upstream(SGLANG)
    for config in ('{"format": "other"}', "not json"):
        assert (
            outcome(ours_sglang.uses_dynamo_format, config)
            == outcome(ref.uses_dynamo_format, config)
            == ("raises", True)
        )


@settings(max_examples=200, deadline=None)
@given(
    workers=st.integers(-1, 4),
    batches=st.lists(st.lists(st.integers(0, 5), max_size=6), max_size=5),
    more=st.integers(-1, 2),
)
def test_event_aggregator_matches_vllm(workers, batches, more):
    ref = upstream(VLLM)

    def run(module):
        def removed(n):
            return module.BlockRemoved(block_hashes=[n], medium=None)

        aggregator = outcome(module.KVEventAggregator, workers)
        if aggregator[0] == "raises":
            return aggregator
        agg = aggregator[1]
        trace = []
        for batch in batches:
            agg.add_events([removed(n) for n in batch])
            trace.append(sorted(e.block_hashes[0] for e in agg.get_common_events()))
        trace.append(outcome(agg.increment_workers, more))
        trace.append(sorted(e.block_hashes[0] for e in agg.get_all_events()))
        trace.append(agg.get_number_of_workers())
        agg.reset_workers()
        agg.clear_events()
        trace.append((agg.get_number_of_workers(), agg.get_all_events(), repr(agg).split()[1]))
        return trace

    assert run(ours_vllm) == run(ref)
    assert outcome(ours_vllm.KVEventAggregator(1).add_events, (1,)) == ("raises", False)


def test_connector_events_is_the_same_abstract_class():
    ref = upstream(VLLM)
    abstract = lambda cls: sorted(cls.__abstractmethods__)  # noqa: E731
    assert abstract(ours_vllm.KVConnectorKVEvents) == abstract(ref.KVConnectorKVEvents)


def test_vllms_own_config_type_decodes_the_publisher_config_kvevents_reports():
    """vLLM's engine client decodes the ready response into vLLM's KVEventsConfig class: the
    config kvevents reports must decode into that class with the same values."""
    import msgspec

    ref = upstream(VLLM)

    Ready = msgspec.defstruct("Ready", [("kv_events_config", ref.KVEventsConfig | None, None)])

    publisher = ours_vllm.ZmqEventPublisher(0, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", topic="kv")
    try:
        ours = publisher.get_publisher_config()
        theirs = msgspec.msgpack.decode(
            msgspec.msgpack.encode({"kv_events_config": ours}), type=Ready
        ).kv_events_config
    finally:
        publisher.shutdown()
    for field in dataclasses.fields(ref.KVEventsConfig):  # every field vLLM's class has
        assert getattr(theirs, field.name) == getattr(ours, field.name), field.name
