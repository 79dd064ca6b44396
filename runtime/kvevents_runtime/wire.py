"""What the generated package hands the runtime: every piece whose shape the schema decides.

The runtime owns sockets, threads, queues, sessions and sequencing; it never builds or
parses a frame itself. A `Wire` carries the frame codecs rendered from the AsyncAPI
document, the publisher's chunk senders rendered once per frame layout, and the decoder
rendered from the event schema.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

Frames = Sequence[bytes]
RingEntry = tuple[int, bytes, bytes]
"""`(seq, seq frame, payload)` as the live sender buffers it for replay."""


class ReplayReply(Protocol):
    """One replay reply as a DEALER receives it: a batch, the END marker or an info reply."""

    @property
    def seq(self) -> int: ...

    @property
    def payload(self) -> bytes: ...

    @property
    def is_end(self) -> bool: ...

    @property
    def is_info(self) -> bool: ...


class Info(Protocol):
    """What an info reply says (AsyncAPI PublisherInfo)."""

    instance: bytes
    next_seq: int
    oldest_seq: int
    topic: str
    dialect: str
    schema_version: str
    busy: bool
    snapshots: bool


class LiveChunkSender(Protocol):
    """Sends up to `budget` queued batches as live messages; returns `(next seq, taken, sent)`."""

    def __call__(
        self,
        take: Callable[[], Any],
        send: Callable[..., Any],
        topic: bytes,
        encode: Callable[[Any], bytes],
        ring: list[RingEntry | None],
        capacity: int,
        seq: int,
        budget: int,
        on_encode_failure: Callable[[Any, BaseException], None],
        on_send_failure: Callable[[int, BaseException], None],
    ) -> tuple[int, int, int]: ...


class ReplaySession:
    """One peer's replay in flight, as the generated chunk senders advance it."""

    __slots__ = ("bytes_left", "end", "first", "identity", "next", "next_then", "progressed")

    def __init__(self, identity: bytes, first: int, end: int, bytes_left: int, now: float) -> None:
        self.identity = identity
        self.first = first
        """The seq it started at."""
        self.next = first
        """The next seq to send."""
        self.end = end
        """Where it ends: the newest seq when asked, or earlier once `bytes_left` runs out."""
        self.bytes_left = bytes_left
        self.progressed = now
        """When `next` last moved (checked about once a second)."""
        self.next_then = first - 1
        """`next` at that check."""


class ReplayChunkSender(Protocol):
    """Sends up to `budget` buffered entries across the open replay sessions, round-robin;
    returns `(entries sent, sessions ended because their peer was gone)`."""

    def __call__(
        self,
        sessions: deque[ReplaySession],
        ring: list[RingEntry | None],
        capacity: int,
        oldest: int,
        send: Callable[..., Any],
        topic: bytes,
        budget: int,
    ) -> tuple[int, int]: ...


@dataclass(frozen=True)
class Wire:
    """The schema-bound pieces of one wire protocol, as the generated package renders them."""

    parse_seq: Callable[[bytes], int]
    """A live seq frame to its int; raises the runtime's FrameError when malformed."""
    seq_size: int
    """Bytes of a seq frame (big-endian unsigned)."""
    end_seq: int
    """The END marker's seq, which no batch carries; as a replay start, the info request."""
    schema_version: str
    pack_replay_request: Callable[[int], tuple[bytes, ...]]
    pack_replay_request_with_info: Callable[[int], tuple[bytes, ...]]
    pack_info_request: Callable[[], tuple[bytes, ...]]
    pack_snapshot_request: Callable[[int], tuple[bytes, ...]]
    parse_replay_request: Callable[[Frames], tuple[bytes, int, str]]
    """`(identity, start, flag)` of a request as the ROUTER receives it, `flag` being "",
    "info" or "snapshot"; raises FrameError."""
    parse_replay_reply: Callable[[Frames], ReplayReply]
    pack_info_reply: Callable[[bytes, bytes, bytes, bool], tuple[bytes, ...]]
    """`(identity, topic, info payload, with_topic)` to the info reply's frames."""
    pack_reply: Callable[[bytes, bytes, bytes, bytes, bool], tuple[bytes, ...]]
    """`(identity, topic, seq frame, payload, with_topic)` to one replayed batch's frames."""
    pack_end: Callable[[bytes, bool], tuple[bytes, ...]]
    """`(identity, with_topic)` to the END marker's frames."""
    seq_bytes: Callable[[int], bytes]
    new_info: Callable[..., Info]
    encode_info: Callable[[Any], bytes]
    decode_info: Callable[[bytes], Info]
    """An info payload; raises FrameError when it is not one."""
    send_live_chunk: LiveChunkSender
    replay_senders: Mapping[bool, ReplayChunkSender]
    """The replay chunk sender by reply shape: True sends the topic frame, False does not."""
    new_encoder: Callable[[], Callable[[Any], bytes]]
    """A fresh payload encoder for one publisher thread."""
    decode: Callable[[bytes], Any]
    """A payload to a batch with an `errors` sequence; raises the runtime's DecodeError."""
