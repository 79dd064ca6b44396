"""Closing sockets while their peers go away never takes the process down.

libzmq 4.3.5 aborts the process (session_base.cpp:233) when a socket closed with linger 0 is
half-way through a multipart message to a peer that disconnects at that moment
(kvevents_runtime.closing). The rounds run in a child process, since the failure is an
abort; a bystander socket pair in the same context must still work after every round.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

ROUNDS = 80

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import zmq
    from kvevents import Subscriber, vllm

    ctx = zmq.Context.instance()
    left = ctx.socket(zmq.PAIR)
    port = left.bind_to_random_port("tcp://127.0.0.1")
    right = ctx.socket(zmq.PAIR)
    right.connect(f"tcp://127.0.0.1:{port}")
    batch = vllm.KVEventBatch(ts=0.0, events=[vllm.AllBlocksCleared()])
    for round_ in range(int(sys.argv[1])):
        pub = vllm.ZmqEventPublisher(0, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", buffer_steps=64)
        sub = Subscriber(
            pub.connect_endpoint, pub.connect_replay_endpoint, on_notice=lambda n: None
        )
        for _ in range(200):
            pub.publish(batch)
        started = time.monotonic()
        while time.monotonic() - started < 0.05:
            sub.poll(0.01)
        for _ in range(200):
            pub.publish(batch)  # in flight while the subscriber closes and the publisher stops
        if round_ % 2:
            sub.remove_source(0)
        sub.close()
        pub.shutdown()
        left.send(b"still alive")
        if not right.poll(3000):
            sys.exit(f"round {round_}: a bystander socket no longer delivers")
        right.recv()
    print("ok")
    """
)


def test_subscribers_and_publishers_closing_as_their_peers_leave_never_abort() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROUNDS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", (
        f"exit {done.returncode}: {done.stderr[-2000:]}"
    )
