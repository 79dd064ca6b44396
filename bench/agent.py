"""The consumer side of the benchmark, in its own process.

The parent drives it over a pipe. Every live measurement begins with the same handshake,
because a PUB socket drops everything sent before the subscription has arrived: the parent
publishes warm-up batches until the agent reports the first one seen, then tells the agent
the first timed seq. Timestamps are `time.monotonic()`, one clock for both processes.
"""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import Any

import zmq

END_SEQ = (-1).to_bytes(8, "big", signed=True)
IDLE_TIMEOUT_MS = 2000


Curve = tuple[str, str] | None
"""(client secret certificate, server public certificate) files: a CURVE client; None: plain."""


def _curve_client(curve: Curve) -> Any:
    if curve is None:
        return None
    from kvevents import CurveClient

    return CurveClient.from_files(*curve)


def _sub(ctx: zmq.Context, endpoint: str, topic: str, curve: Curve = None) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    client = _curve_client(curve)
    if client is not None:
        client.apply(sub)
    sub.connect(endpoint)
    return sub


CHUNK = 32
"""Seqs a consumer hands to the timing loop at a time, as `Subscriber.poll` does by default."""


class _Consumer:
    """What the timing loop needs of a consumer: the first warm-up batch, then chunks of
    delivered seqs (empty once nothing arrived for IDLE_TIMEOUT_MS)."""

    def await_first(self) -> bool:
        raise NotImplementedError

    def take(self) -> list[int]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _KveventsConsumer(_Consumer):
    def __init__(self, ctx: zmq.Context, endpoint: str, topic: str, curve: Curve = None) -> None:
        from kvevents import Subscriber

        self.subscriber = Subscriber(
            endpoint,
            None,
            topic,
            join="first_seen",
            idle_probe=None,
            rcvhwm=0,
            context=ctx,
            curve=_curve_client(curve),
        )

    def await_first(self) -> bool:
        deadline = time.monotonic() + 10
        while not self.subscriber.poll(0.05):
            if time.monotonic() > deadline:
                return False
        return True

    def take(self) -> list[int]:
        return [seq for seq, _batch in self.subscriber.poll(IDLE_TIMEOUT_MS / 1000, CHUNK)]

    def close(self) -> None:
        self.subscriber.close()


class _SocketConsumer(_Consumer):
    def __init__(self, ctx: zmq.Context, endpoint: str, topic: str, curve: Curve = None) -> None:
        self.sub = _sub(ctx, endpoint, topic, curve)

    def await_first(self) -> bool:
        if not self.sub.poll(10_000):
            return False
        self.sub.recv_multipart()
        return True

    def close(self) -> None:
        self.sub.close(linger=0)


class _ExampleConsumer(_SocketConsumer):
    """As vLLM's example consumer does: poll, recv_multipart, then a typed decode."""

    def __init__(self, ctx: zmq.Context, endpoint: str, topic: str, curve: Curve = None) -> None:
        import msgspec

        from bench.references import VLLM, load

        super().__init__(ctx, endpoint, topic, curve)
        self.decode = msgspec.msgpack.Decoder(load(VLLM).KVEventBatch).decode

    def take(self) -> list[int]:
        seqs: list[int] = []
        poll, recv_multipart, decode = self.sub.poll, self.sub.recv_multipart, self.decode
        while len(seqs) < CHUNK and poll(0 if seqs else IDLE_TIMEOUT_MS):
            _topic, seq_bytes, payload = recv_multipart()
            decode(payload)
            seqs.append(int.from_bytes(seq_bytes, "big"))
        return seqs


class _ReceiveFloor(_SocketConsumer):
    """The subscriber's receive path with nothing after it: what any consumer pays."""

    def take(self) -> list[int]:
        seqs: list[int] = []
        recv, noblock = self.sub.recv, zmq.NOBLOCK
        while len(seqs) < CHUNK:
            try:
                recv(noblock)
            except zmq.Again:
                if seqs or not self.sub.poll(IDLE_TIMEOUT_MS):
                    break
                continue
            seq = int.from_bytes(recv(noblock), "big")
            frame = recv(noblock, copy=False)
            if frame.more:
                raise RuntimeError("a message of more than 3 frames")
            frame.bytes  # noqa: B018  (the copy the subscriber pays)
            seqs.append(seq)
        return seqs


class _StrictFloor(_SocketConsumer):
    """The least a consumer does that keeps issue 12's framing rule (a message of the wrong
    frame count is dropped whole, never merged with its neighbour) and decodes: every frame
    taken as a `zmq.Frame` for its `more` flag, the seq read, the payload copied and passed
    to the same tolerant decoder as the subscriber's. No ordering, no bookkeeping: whatever
    the subscriber adds to this is its own overhead, and no strictly framed consumer on
    pyzmq can be faster than this row."""

    def __init__(self, ctx: zmq.Context, endpoint: str, topic: str, curve: Curve = None) -> None:
        from kvevents.codec import decode

        super().__init__(ctx, endpoint, topic, curve)
        self.decode = decode

    def take(self) -> list[int]:
        seqs: list[int] = []
        recv, noblock, decode, from_bytes = self.sub.recv, zmq.NOBLOCK, self.decode, int.from_bytes
        while len(seqs) < CHUNK:
            try:
                first = recv(noblock, copy=False)
            except zmq.Again:
                if seqs or not self.sub.poll(IDLE_TIMEOUT_MS):
                    break
                continue
            second = recv(noblock, copy=False) if first.more else None
            last = recv(noblock, copy=False) if second is not None and second.more else None
            if last is None or last.more:
                raise RuntimeError("every sender here sends exactly three frames")
            decode(last.bytes)
            seqs.append(from_bytes(second, "big"))  # type: ignore[arg-type]  # Frame has the buffer protocol
        return seqs


CONSUMERS = {
    "kvevents": _KveventsConsumer,
    "vllm_example": _ExampleConsumer,
    "recv_floor": _ReceiveFloor,
    "strict_floor": _StrictFloor,
}


def _handshake(source: _Consumer, conn: Connection) -> tuple[int, int] | None:
    """Reports the first warm-up batch seen, then returns the (first, last) timed seqs the
    parent sends back; None (the parent told why) if no warm-up batch arrived."""
    if not source.await_first():
        conn.send({"error": "no warm-up batch arrived within 10 s"})
        return None
    conn.send({"seen": True})
    go = conn.recv()
    return go["first"], go["first"] + go["n"] - 1


def count(
    ctx: zmq.Context, conn: Connection, endpoint: str, topic: str, curve: Curve = None
) -> None:
    """The cheapest possible consumer (three `recv()` calls, the seq parsed, nothing decoded):
    end to end the publisher is the bottleneck, never this."""
    source = _SocketConsumer(ctx, endpoint, topic, curve)
    try:
        timed = _handshake(source, conn)
        if timed is None:
            return
        first, last = timed
        sub = source.sub
        recv, poll, noblock = sub.recv, sub.poll, zmq.NOBLOCK
        received = 0
        in_order = True
        previous = first - 1
        t_last = None
        # Every sender here sends exactly three frames; poll only when the queue is empty.
        while True:
            try:
                recv(noblock)
            except zmq.Again:
                if not poll(IDLE_TIMEOUT_MS):
                    break
                continue
            seq = int.from_bytes(recv(), "big")
            recv()
            if seq < first:
                continue
            received += 1
            in_order &= seq > previous
            previous = seq
            t_last = time.monotonic()
            if seq >= last:
                break
        conn.send({"received": received, "t_last": t_last, "in_order": in_order})
    finally:
        source.close()


def deliver(
    ctx: zmq.Context,
    conn: Connection,
    endpoint: str,
    topic: str,
    consumer: str,
    curve: Curve = None,
) -> None:
    """A consumer handing decoded batches to its caller, timed from `go` (sent after the whole
    backlog) to the last delivery, so the figure is the consumer's own rate."""
    source = CONSUMERS[consumer](ctx, endpoint, topic, curve)
    try:
        timed = _handshake(source, conn)
        if timed is None:
            return
        first, last = timed
        t0 = time.monotonic()
        delivered, previous, in_order, t_last = 0, first - 1, True, None
        while previous < last:
            seqs = source.take()
            if not seqs:
                break
            for seq in seqs:
                if seq < first:
                    continue
                delivered += 1
                in_order &= seq == previous + 1
                previous = seq
            t_last = time.monotonic()
    finally:
        source.close()
    elapsed = None if t_last is None else t_last - t0
    conn.send({"received": delivered, "elapsed": elapsed, "in_order": in_order})


def replay(
    ctx: zmq.Context, conn: Connection, endpoint: str, cases: list[tuple[str, int]], reps: int
) -> None:
    """Times replay requests, each from send to the END marker, as a DEALER client."""
    results: dict[str, list[tuple[float | None, int]]] = {label: [] for label, _ in cases}

    def connect() -> zmq.Socket:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)
        dealer.connect(endpoint)
        return dealer

    dealer = connect()
    noblock = zmq.NOBLOCK
    try:
        for _ in range(reps):
            for label, start in cases:
                recv = dealer.recv
                entries = 0
                t0 = time.perf_counter()
                # The empty delimiter makes it the REQ-shaped request every publisher accepts.
                dealer.send_multipart([b"", start.to_bytes(8, "big")])
                elapsed = None
                # Every publisher here replies in the with-topic shape: four frames per entry
                # and for END. recv() per frame, polling only when nothing is queued, keeps
                # the client from being what is measured.
                while True:
                    try:
                        recv(noblock)
                    except zmq.Again:
                        if not dealer.poll(5000):
                            break
                        continue
                    recv()
                    seq_frame = recv()
                    recv()
                    if seq_frame == END_SEQ:
                        elapsed = time.perf_counter() - t0
                        break
                    entries += 1
                if elapsed is None:
                    # Whatever is still in flight must not be read as the next reply.
                    dealer.close(linger=0)
                    dealer = connect()
                results[label].append((elapsed, entries))
        conn.send({"results": results})
    finally:
        dealer.close(linger=0)


def serve(conn: Connection) -> None:
    ctx = zmq.Context()
    handlers: dict[str, Any] = {"count": count, "deliver": deliver, "replay": replay}
    try:
        while True:
            command = conn.recv()
            op = command.pop("op")
            if op == "quit":
                return
            try:
                handlers[op](ctx, conn, **command)
            except Exception as exc:  # reported to the parent, which prints it
                conn.send({"error": f"{op}: {type(exc).__name__}: {exc}"})
    finally:
        ctx.destroy(linger=0)


class Agent:
    """Handle on the agent process."""

    def __init__(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.conn, child = spawn.Pipe()
        self.process = spawn.Process(target=serve, args=(child,), name="bench-agent", daemon=True)
        self.process.start()
        child.close()

    def send(self, **command: Any) -> None:
        self.conn.send(command)

    def poll(self, timeout: float) -> bool:
        return self.conn.poll(timeout)

    def recv(self, timeout: float = 120.0) -> dict[str, Any]:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"the bench agent did not answer within {timeout} s")
        reply = self.conn.recv()
        if "error" in reply:
            raise RuntimeError(f"bench agent: {reply['error']}")
        return reply  # type: ignore[no-any-return]

    def close(self) -> None:
        try:
            self.send(op="quit")
        except OSError:
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
