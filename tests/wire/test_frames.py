"""Frame codecs generated from the AsyncAPI document."""

from __future__ import annotations

import pytest

from kvevents import FrameError, frames


def test_live_frames_round_trip() -> None:
    packed = frames.pack_live_batch(b"kv", frames.seq_bytes(5), b"\x93")
    assert packed == (b"kv", b"\x00" * 7 + b"\x05", b"\x93")
    assert frames.parse_live_batch(packed) == (b"kv", 5, b"\x93")


@pytest.mark.parametrize(
    "bad", [[b"kv", b"\x00" * 8], [b"kv", b"\x00" * 7, b"p"], [b"a", b"\x00" * 8, b"p", b"x"]]
)
def test_malformed_live_frames_raise_the_typed_error(bad: list[bytes]) -> None:
    with pytest.raises(FrameError):
        frames.parse_live_batch(bad)


@pytest.mark.parametrize(
    ("frame", "start"),
    [(b"", 0), (b"\x00\x04", 4), (b"\x00" * 7 + b"\x0a", 10), (b"\xff" * 8, 2**64 - 1)],
)
def test_start_seq_follows_the_upstream_rule(frame: bytes, start: int) -> None:
    assert frames.parse_start_seq(frame) == start


def test_start_seq_longer_than_8_bytes_is_invalid() -> None:
    with pytest.raises(FrameError):
        frames.parse_start_seq(b"\x00" * 9)


def test_dealer_request_and_router_view() -> None:
    assert frames.pack_replay_request(10) == (b"", b"\x00" * 7 + b"\x0a")
    assert frames.parse_replay_request([b"id", b"", b"\x00\x0a"]) == (b"id", 10, "")
    with pytest.raises(FrameError):
        frames.parse_replay_request([b"id", b"\x00\x0a"])
    with pytest.raises(FrameError):
        frames.parse_replay_request([b"id", b"", b"\x0a", b"nope"])


def test_info_request_and_reply_frames() -> None:
    """The info request is a replay request from END_SEQ: what vLLM's and SGLang's own
    publishers answer with a bare END marker; kvevents answers END_SEQ + PublisherInfo."""
    request = frames.pack_info_request()
    assert request == (b"", frames.END_SEQ)
    assert frames.parse_replay_request([b"id", *request]) == (b"id", frames.END_SEQ_INT, "")
    flagged = frames.pack_replay_request_with_info(7)
    assert frames.parse_replay_request([b"id", *flagged]) == (b"id", 7, "info")
    snapshot = frames.pack_snapshot_request(0)
    assert snapshot == (b"", b"\x00" * 8, b"snap")
    assert frames.parse_replay_request([b"id", *snapshot]) == (b"id", 0, "snapshot")
    info = frames.PublisherInfo(
        instance=b"i" * 16,
        next_seq=9,
        oldest_seq=2,
        topic="kv",
        dialect="vllm",
        schema_version=frames.SCHEMA_VERSION,
    )
    for reply in (
        frames.pack_info_reply_with_topic(b"id", b"kv", frames.encode_info(info)),
        frames.pack_info_reply_without_topic(b"id", frames.encode_info(info)),
    ):
        item = frames.parse_replay_reply(reply[1:])
        assert item.is_info and not item.is_end
        assert frames.decode_info(item.payload) == info
    with pytest.raises(FrameError):
        frames.decode_info(b"\x93\x01\x02\x03")


def test_both_reply_shapes_and_end_markers() -> None:
    seq = frames.seq_bytes(3)
    with_topic = frames.pack_replay_reply_with_topic(b"id", b"kv", seq, b"p")
    without = frames.pack_replay_reply_without_topic(b"id", seq, b"p")
    assert with_topic == (b"id", b"", b"kv", seq, b"p")
    assert without == (b"id", b"", seq, b"p")
    assert frames.parse_replay_reply(with_topic[1:]) == (b"kv", 3, b"p")
    assert frames.parse_replay_reply(without[1:]) == (None, 3, b"p")
    end = frames.pack_replay_end_with_topic(b"id")
    assert end == (b"id", b"", b"", frames.END_SEQ, b"")
    assert frames.parse_replay_reply(end[1:]).is_end
    assert frames.parse_replay_reply(frames.pack_replay_end_without_topic(b"id")[1:]).is_end
    assert frames.END_SEQ == (-1).to_bytes(8, "big", signed=True)


@pytest.mark.parametrize(
    "bad",
    [
        [b"", b"kv"],
        [b"x", b"\x00" * 8, b"p"],
        [b"", b"\x00" * 7, b"payload"],
        [b"", b"", b"", b"", b""],
    ],
)
def test_malformed_replies_raise(bad: list[bytes]) -> None:
    with pytest.raises(FrameError):
        frames.parse_replay_reply(bad)
