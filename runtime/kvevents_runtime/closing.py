"""Closing ZeroMQ sockets without aborting the process.

libzmq 4.3.5 (the one pyzmq 27 ships) aborts the whole process with "Resource temporarily
unavailable (src/session_base.cpp:233)" when a socket closed with linger 0 is half-way
through handing a multipart message to a peer that disconnects at that moment: the session
tries to drain the rest of the message from a pipe that the zero linger has already torn
down. A publisher shut down right after its subscriber went away hit it within 60 rounds
(tests/runtime/test_closing.py). A short linger keeps the pipe readable through that drain;
`close` still returns at once, and only a context's termination waits, at most this long.
"""

from __future__ import annotations

import zmq

CLOSE_LINGER_MS = 100


def close_socket(sock: zmq.Socket) -> None:
    """Close with the short linger above. Idempotent, as pyzmq's close is."""
    sock.close(linger=CLOSE_LINGER_MS)
