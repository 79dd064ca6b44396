"""Free TCP ports that a publisher restarted in place can bind again.

Port 0 gets a port from the kernel's ephemeral range, the range every outgoing connection's
source port is drawn from too. While a publisher on such a port is down, a peer reconnecting
to it (a SUB socket retries every 100 ms) can be handed that very port as its own source port
and connect to itself (TCP simultaneous open); it then holds the port, and the restarted
publisher fails with 'Address already in use'. A port below the ephemeral range is never
handed out that way, so it stays free while its publisher is down.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from .endpoints import split_tcp
from .errors import EndpointError

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
FALLBACK_EPHEMERAL_LOW = 32768
"""Linux's default low end; where the kernel's setting cannot be read (other systems use
49152, above it), ports below this one are outside the range everywhere."""
LOWEST = 10_000
"""Below this lie the well-known and commonly configured service ports."""
ATTEMPTS = 64


def ephemeral_low() -> int:
    """The lowest port the kernel hands out for port 0 and outgoing connections."""
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return FALLBACK_EPHEMERAL_LOW


def stable_port(host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A port free on `host` now and below the ephemeral range: bind it, shut down, bind it
    again. Drawn at random, so two processes asking at once rarely get the same one; the
    probe does not hold it, so bind it soon. EndpointError when none of 64 tries is free."""
    top = ephemeral_low()
    bottom = LOWEST if top - LOWEST >= 1000 else 1024
    if top - bottom < 1:
        raise EndpointError(f"the ephemeral range starts at {top}: no port below it to use")
    draw = rng or random.SystemRandom()
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    for _ in range(ATTEMPTS):
        port = draw.randrange(bottom, top)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((bare, port))
            except OSError:
                continue
        return port
    raise EndpointError(f"no free port on {host} below {top} after {ATTEMPTS} tries")


def pin_port(endpoint: str) -> str:
    """`endpoint` with port 0 replaced by a stable port (tcp only; others unchanged), for a
    publisher that will be restarted on the endpoint it had."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, port = split_tcp(endpoint)
    if port:
        return endpoint
    return f"tcp://{host}:{stable_port('0.0.0.0' if host == '*' else host)}"
