"""CURVE on kvevents' own ZeroMQ hops: encryption and client allow-lists, off by default.

vLLM's and SGLang's own peers speak plain ZeroMQ, so nothing here is on unless configured:
explicitly (`CurveServer`, `CurveClient`) or through the environment, never through keys
added to an engine's config class (vLLM's and SGLang's reject unknown keys):

- a publisher: ``KVEVENTS_CURVE_SECRET`` (its secret certificate, as `zmq.auth` writes it)
  and ``KVEVENTS_CURVE_CLIENTS`` (a directory of the allowed clients' public certificates);
- a subscriber, `tap`, `kvevents index`, `kvevents bridge`: ``KVEVENTS_CURVE_CLIENT_SECRET``
  (its own secret certificate) and ``KVEVENTS_CURVE_SERVER`` (the publisher's public one, for
  every source); or the pair alone, with each source's server key given apart (`/register`'s
  ``curve_server_key``, the bridge's per-engine ``curve_server_key``).

`kvevents keys DIR NAME` writes a pair (`make_keys`). A publisher refuses a client whose
public key is not in the directory (counted: `CurveServer.refused`); a client with a wrong
server key cannot complete the handshake and receives nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .ratelimit import RateLimitedLog

logger = logging.getLogger("kvevents.security")

ENV_SERVER_SECRET = "KVEVENTS_CURVE_SECRET"
ENV_ALLOWED_CLIENTS = "KVEVENTS_CURVE_CLIENTS"
ENV_CLIENT_SECRET = "KVEVENTS_CURVE_CLIENT_SECRET"
ENV_SERVER_PUBLIC = "KVEVENTS_CURVE_SERVER"


class SecurityError(ValueError):
    """A CURVE setting that cannot be used (a missing or unreadable key file)."""


def make_keys(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write a CURVE key pair as `zmq.auth` does: `<name>.key` (public, to hand out) and
    `<name>.key_secret` (secret, mode 0600). Returns their paths."""
    if not zmq.has("curve"):
        raise SecurityError("this libzmq was built without CURVE")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(folder), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def _load(path: str | os.PathLike[str], secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read the CURVE certificate {str(path)!r}: {exc}") from None
    if secret and secret_key is None:
        raise SecurityError(f"{str(path)!r} holds no secret key (give the .key_secret file)")
    return public, secret_key


class CurveServer:
    """A publisher's key pair and the public keys of the clients it accepts."""

    def __init__(
        self, secret_file: str | os.PathLike[str], allowed_dir: str | os.PathLike[str]
    ) -> None:
        self.public_key, secret = _load(secret_file, secret=True)
        assert secret is not None
        self.secret_key = secret
        folder = Path(allowed_dir)
        if not folder.is_dir():
            raise SecurityError(f"the allowed clients' directory {str(folder)!r} does not exist")
        self.allowed = frozenset(zmq.auth.load_certificates(str(folder)))
        self.domain = f"kvevents-{id(self):x}"
        self.refused = 0
        """Handshakes refused: a client whose public key is not allowed."""
        self.accepted = 0
        self._log = RateLimitedLog(logger, interval=10.0)

    @classmethod
    def from_env(cls) -> CurveServer | None:
        secret = os.environ.get(ENV_SERVER_SECRET)
        allowed = os.environ.get(ENV_ALLOWED_CLIENTS)
        if not secret and not allowed:
            return None
        if not secret or not allowed:
            raise SecurityError(f"set both {ENV_SERVER_SECRET} and {ENV_ALLOWED_CLIENTS}")
        return cls(secret, allowed)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """pyzmq's ZAP authenticator asks here for each handshake on this server's sockets."""
        if client_key in self.allowed:
            self.accepted += 1
            return True
        self.refused += 1
        self._log.warning(
            "kvevents: refused a CURVE client whose key is not allowed: %s",
            client_key.decode("ascii", "replace"),
        )
        return False

    def apply(self, sock: zmq.Socket, context: zmq.Context) -> None:
        """Make `sock` a CURVE server checked against this allow-list (before bind)."""
        _zap_for(context).add(self)
        sock.setsockopt(zmq.ZAP_DOMAIN, self.domain.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public_key)
        sock.setsockopt(zmq.CURVE_SERVER, 1)


class CurveClient:
    """A subscriber's key pair and the public key of the publisher it trusts (z85 text, 40
    characters each, as `zmq.auth` certificates hold them)."""

    def __init__(self, public_key: bytes, secret_key: bytes, server_key: bytes) -> None:
        for name, key in (("public", public_key), ("secret", secret_key), ("server", server_key)):
            if len(key) != 40:
                raise SecurityError(f"a CURVE {name} key is 40 z85 characters, got {len(key)}")
        self.public_key = public_key
        self.secret_key = secret_key
        self.server_key = server_key

    @classmethod
    def from_files(
        cls, secret_file: str | os.PathLike[str], server_public_file: str | os.PathLike[str]
    ) -> CurveClient:
        public, secret = _load(secret_file, secret=True)
        assert secret is not None
        server, _ = _load(server_public_file, secret=False)
        return cls(public, secret, server)

    @classmethod
    def from_env(cls) -> CurveClient | None:
        secret = os.environ.get(ENV_CLIENT_SECRET)
        server = os.environ.get(ENV_SERVER_PUBLIC)
        if not server:
            return None  # a pair alone serves sources whose server key is given apart
        if not secret:
            raise SecurityError(f"{ENV_SERVER_PUBLIC} is set: set {ENV_CLIENT_SECRET} too")
        return cls.from_files(secret, server)

    @classmethod
    def own_keys_from_env(cls, server_key: str | bytes) -> CurveClient:
        """This process's pair (``KVEVENTS_CURVE_CLIENT_SECRET``) for a server whose key is
        given apart (e.g. per source registered with `kvevents index`)."""
        secret = os.environ.get(ENV_CLIENT_SECRET)
        if not secret:
            raise SecurityError(
                f"a CURVE server key was given but {ENV_CLIENT_SECRET} (this side's pair) is not set"
            )
        public, secret_key = _load(secret, secret=True)
        assert secret_key is not None
        key = server_key.encode() if isinstance(server_key, str) else server_key
        return cls(public, secret_key, key)

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of the trusted server (before connect)."""
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public_key)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_key)


class _Zap:
    """One ZAP handler per context (libzmq allows one), dispatching by domain to each
    `CurveServer` that uses the context."""

    def __init__(self, context: zmq.Context) -> None:
        self.authenticator = ThreadAuthenticator(context, log=logger)
        _start_daemonic(self.authenticator)
        self.servers: dict[str, CurveServer] = {}

    def add(self, server: CurveServer) -> None:
        if server.domain not in self.servers:
            self.servers[server.domain] = server
            self.authenticator.configure_curve_callback(server.domain, server)


def _start_daemonic(authenticator: ThreadAuthenticator) -> None:
    """Start it from a daemon thread. pyzmq 25 makes its ZAP thread non-daemonic, and a
    process that never stopped it hung at exit (CI's lowest-versions run). A thread takes its
    daemon status from the thread that creates it."""
    failed: list[BaseException] = []

    def start() -> None:
        try:
            authenticator.start()
        except BaseException as exc:  # re-raised on the caller's thread
            failed.append(exc)

    starter = threading.Thread(target=start, name="kvevents-zap-start", daemon=True)
    starter.start()
    starter.join()
    if failed:
        raise failed[0]


_zaps: weakref.WeakKeyDictionary[zmq.Context, _Zap] = weakref.WeakKeyDictionary()
_zaps_lock = threading.Lock()


def _zap_for(context: zmq.Context) -> _Zap:
    with _zaps_lock:
        zap = _zaps.get(context)
        if zap is None:
            zap = _zaps[context] = _Zap(context)
        return zap


_warned = threading.Event()


def warn_if_exposed(endpoint: str, curve: object | None) -> None:
    """One warning per process (a node's DP ranks bind many): binding every interface
    without CURVE lets anyone who can reach the host read prompts' token ids (and, on a
    replay socket, ask for them)."""
    if curve is not None or not endpoint.startswith("tcp://") or _warned.is_set():
        return
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host not in ("*", "0.0.0.0", "::", ""):
        return
    _warned.set()
    logger.warning(
        "kvevents: %s binds every interface without CURVE: anyone who can reach this host "
        "can read the token ids of its prompts; bind 127.0.0.1 or set %s and %s (said once "
        "per process)",
        endpoint,
        ENV_SERVER_SECRET,
        ENV_ALLOWED_CLIENTS,
    )
