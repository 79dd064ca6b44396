"""The publishers under test, each built with the same producer arguments.

kvevents' drop-in classes are paired with the producer they replace: `kvevents.vllm` with vLLM
0.33.0 and `kvevents.sglang` with SGLang 0.5.23, so every ratio compares byte-identical wire
output. `RawSender` is the floor: pre-encoded frames sent with per-frame `send` from the
caller's thread, no queue and no encoding.
"""

from __future__ import annotations

import atexit
import itertools
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import msgspec
import zmq

from kvevents_runtime.publisher import unwrapped_send

from . import references

TOPIC = "kv"
HWM = 100_000
MAX_QUEUE = 100_000
_ipc_dir = tempfile.mkdtemp(prefix="kvevents-bench-")
_names = itertools.count()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def endpoints(transport: str) -> tuple[str, str]:
    """(bind, connect) addresses for one socket; the bind form binds for every publisher."""
    if transport == "tcp":
        port = free_port()
        return f"tcp://*:{port}", f"tcp://127.0.0.1:{port}"
    if transport == "ipc":
        path = os.path.join(_ipc_dir, f"s{next(_names)}")
        return f"ipc://{path}", f"ipc://{path}"
    raise ValueError(f"unknown transport {transport!r}")


@dataclass(frozen=True)
class Impl:
    key: str
    label: str
    dialect: str
    structs: ModuleType
    ours: bool

    def make(
        self, endpoint: str, replay_endpoint: str | None, buffer_steps: int = 10_000, **ours: Any
    ) -> Any:
        """The publisher with the producer's arguments; `ours` are kvevents-only keywords."""
        args = (0, endpoint, replay_endpoint, buffer_steps, HWM, MAX_QUEUE, TOPIC)
        return self.structs.ZmqEventPublisher(*args, **(ours if self.ours else {}))

    def close(self, publisher: Any) -> None:
        publisher.shutdown()
        # SGLang also registers shutdown with atexit, which would then wait 1 s per publisher.
        atexit.unregister(publisher.shutdown)

    def thread(self, publisher: Any) -> threading.Thread:
        if self.ours:
            return publisher.thread  # type: ignore[no-any-return]
        return publisher._thread  # type: ignore[no-any-return]

    def done(self, publisher: Any, total: int) -> bool:
        """Every one of `total` published batches has been encoded, sent and buffered."""
        if self.ours:
            return publisher.counters()["next_seq"] >= total  # type: ignore[no-any-return]
        return publisher._event_queue.unfinished_tasks == 0  # type: ignore[no-any-return]


def load_impls() -> dict[str, Impl]:
    import kvevents.sglang
    import kvevents.vllm

    vllm = references.load(references.VLLM)
    sglang = references.load(references.SGLANG)
    impls = [
        Impl("kvevents-vllm", "kvevents.vllm", "vllm", kvevents.vllm, True),
        Impl("vllm", "vLLM 0.33.0", "vllm", vllm, False),
        Impl("kvevents-sglang", "kvevents.sglang", "sglang", kvevents.sglang, True),
        Impl("sglang", "SGLang 0.5.23", "sglang", sglang, False),
    ]
    return {impl.key: impl for impl in impls}


PAIRS = (("kvevents-vllm", "vllm"), ("kvevents-sglang", "sglang"))


RAW_SENDERS = {
    "raw": "raw per-frame send (Socket.send)",
    "raw-unwrapped": "raw per-frame send (backend send, as kvevents)",
}


class RawSender:
    """Pre-encoded (topic, seq, payload) frames sent with per-frame `send` from the caller's
    thread: no queue, no encoding. `unwrapped` sends through the backend method kvevents'
    loop uses instead of pyzmq's public `Socket.send`, which the target is defined by."""

    def __init__(
        self, endpoint: str, payloads: list[bytes], hwm: int = HWM, unwrapped: bool = False
    ) -> None:
        self.unwrapped = unwrapped
        self.pub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, hwm)
        self.pub.bind(endpoint)
        self.topic = TOPIC.encode()
        self.payloads = payloads
        self.seq = 0
        self.prepared: list[tuple[bytes, bytes]] = []

    def send_one(self) -> None:
        self.pub.send_multipart([self.topic, self.seq.to_bytes(8, "big"), self.payloads[0]])
        self.seq += 1

    def prepare(self, count: int) -> None:
        """Encodes the next `count` seq frames ahead of the timed loop."""
        payloads = self.payloads
        self.prepared = [
            (seq.to_bytes(8, "big"), payloads[seq % len(payloads)])
            for seq in range(self.seq, self.seq + count)
        ]

    def send_prepared(self) -> None:
        send = unwrapped_send(self.pub) if self.unwrapped else self.pub.send
        more, topic = zmq.SNDMORE, self.topic
        for seq_frame, payload in self.prepared:
            send(topic, more)
            send(seq_frame, more)
            send(payload)
        self.seq += len(self.prepared)

    def close(self) -> None:
        self.pub.close(linger=0)


def encode_all(batches: list[Any]) -> list[bytes]:
    encode = msgspec.msgpack.Encoder().encode
    return [encode(batch) for batch in batches]
