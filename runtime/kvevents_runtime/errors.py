"""The typed errors of kvevents; no bare msgspec or zmq error crosses the API."""


class KVEventsError(Exception):
    """Base of every kvevents error."""


class DecodeError(KVEventsError, ValueError):
    """A payload or frame list is not a KV event batch; the message says why."""


class FrameError(DecodeError):
    """A ZeroMQ frame list does not have the layout of its message."""


class EncodeError(KVEventsError, ValueError):
    """A batch cannot be written in the requested dialect."""


class EndpointError(KVEventsError, ValueError):
    """An endpoint cannot be bound or connected (bad form, port in use, ...)."""


class SourceLimitError(KVEventsError, RuntimeError):
    """No more sources can be followed: a limit of the process (open files, ZeroMQ sockets)
    is reached; the message names it."""
