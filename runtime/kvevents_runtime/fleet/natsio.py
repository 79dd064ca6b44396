"""The few NATS calls the bridge and the replicas share, with nats-py imported on first use
(it is the `fleet` extra, not a core dependency)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..ratelimit import RateLimitedLog

logger = logging.getLogger("kvevents.fleet")

MIN_SERVER = (2, 10)
"""nats-server 2.9 accepts `filter_subjects` and ignores it (a replica of one model would
read every model's messages): older servers are refused."""


def _nats() -> Any:
    try:
        import nats
    except ImportError:
        raise ImportError(
            "the fleet (bridge and NATS replicas) needs nats-py: pip install 'kvevents[fleet]'"
        ) from None
    return nats


CONNECT_TIMEOUT = 15.0
"""Seconds the first connection may take; after it, reconnection goes on forever."""


async def connect_jetstream(
    servers: str | list[str], connect_timeout: float = CONNECT_TIMEOUT, **options: Any
) -> tuple[Any, Any]:
    """`(connection, jetstream context)`. Once connected it reconnects forever (a bridge
    and a replica outlive a NATS restart); the first connection fails with ConnectionError
    after `connect_timeout`. TLS and credentials pass through `options` as nats-py names
    them (`tls`, `user`, `password`, `token`, `nkeys_seed`, `user_credentials`)."""
    nats = _nats()
    if isinstance(servers, str):
        servers = [url.strip() for url in servers.split(",") if url.strip()]
    errors = RateLimitedLog(logger, interval=5.0)
    last_error: list[Exception] = []

    async def error_cb(exc: Exception) -> None:
        last_error[:] = [exc]
        errors.warning("kvevents: NATS: %r", exc)

    async def disconnected_cb() -> None:
        if nc is not None and not nc.is_closed and not nc.is_draining:
            logger.warning("kvevents: NATS connection lost, reconnecting")

    async def reconnected_cb() -> None:
        logger.info("kvevents: NATS reconnected")

    settings: dict[str, Any] = {
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
        **options,
    }
    nc: Any = None
    try:
        nc = await asyncio.wait_for(nats.connect(servers, **settings), connect_timeout)
    except TimeoutError:
        cause = f": {last_error[0]!r}" if last_error else ""
        raise ConnectionError(
            f"cannot reach NATS at {servers} within {connect_timeout:g} s{cause}"
        ) from None
    version = tuple(int(part) for part in (nc._server_info.get("version", "0.0").split(".")[:2]))
    if version < MIN_SERVER:
        await nc.close()
        raise RuntimeError(
            f"nats-server {nc._server_info.get('version')} is too old: kvevents needs "
            f"{MIN_SERVER[0]}.{MIN_SERVER[1]} or newer (2.9 ignores filter_subjects)"
        )
    if not nc._server_info.get("jetstream"):
        await nc.close()
        raise RuntimeError("this nats-server runs without JetStream (start it with -js)")
    return nc, nc.jetstream()


async def ensure_stream(js: Any, name: str, root: str, max_age: float) -> None:
    """The events stream, created when missing. Retention is by age alone (never by the
    slowest reader); a stream that exists is left as its operator configured it."""
    nats = _nats()
    from nats.js.api import StorageType, StreamConfig

    try:
        await js.stream_info(name)
        return
    except nats.js.errors.NotFoundError:
        pass
    config = StreamConfig(
        name=name,
        subjects=[f"{root}.>"],
        storage=StorageType.FILE,
        max_age=max_age,
        duplicate_window=min(120.0, max_age),
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        try:
            await js.stream_info(name)  # another bridge created it first
        except nats.js.errors.NotFoundError:
            raise RuntimeError(
                f"stream {name!r} (subjects {root}.>) cannot be created: {exc.description}; "
                "a stream holding other subjects under that root needs another root"
            ) from exc


async def ensure_bucket(js: Any, bucket: str) -> Any:
    """The snapshot object store, created when missing."""
    nats = _nats()
    try:
        return await js.object_store(bucket)
    except nats.js.errors.NotFoundError:
        pass
    from nats.js.api import ObjectStoreConfig, StorageType

    try:
        return await js.create_object_store(
            bucket, config=ObjectStoreConfig(bucket=bucket, storage=StorageType.FILE)
        )
    except nats.js.errors.BadRequestError:
        return await js.object_store(bucket)


class ObjectReadError(Exception):
    """An object-store object that could not be read whole (gone, corrupt, or not delivered
    in time)."""


async def read_object(objects: Any, js: Any, bucket: str, name: str, timeout: float) -> bytes:
    """One object-store object's bytes, or ObjectReadError within `timeout` seconds.

    nats-py's `ObjectStore.get` reads the chunks with no deadline: a server restart in the
    middle leaves it waiting forever (and a replica's reader with it). This reads the same
    chunks through its own ordered consumer, bounded, and always unsubscribes it."""
    import base64
    import hashlib

    deadline = asyncio.get_running_loop().time() + timeout
    info = await asyncio.wait_for(objects.get_info(name), timeout)
    if info.size == 0:
        return b""
    digest = hashlib.sha256()
    chunks: list[bytes] = []
    sub = await js.subscribe(f"$O.{bucket}.C.{info.nuid}", ordered_consumer=True)
    try:
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise ObjectReadError(f"{name}: not read whole within {timeout:g} s")
            try:
                msg = await sub.next_msg(timeout=remaining)
            except TimeoutError:
                raise ObjectReadError(f"{name}: not read whole within {timeout:g} s") from None
            chunks.append(msg.data)
            digest.update(msg.data)
            if msg.metadata.num_pending == 0:
                break
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # a connection being re-made: the server drops the consumer itself
            pass
    expected = (info.digest or "").split("=", 1)[-1]
    if base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=") != expected.rstrip("="):
        raise ObjectReadError(f"{name}: digest mismatch")
    return b"".join(chunks)


def is_transient(exc: BaseException) -> bool:
    """A read worth trying again: a deadline or a connection being re-made, not an object
    that is gone or a payload that is not a snapshot."""
    if isinstance(exc, ObjectReadError | TimeoutError):
        return True
    _nats()
    import nats.errors
    import nats.js.errors

    return isinstance(exc, nats.errors.Error) and not isinstance(exc, nats.js.errors.NotFoundError)
