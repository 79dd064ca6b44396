"""How KV events are laid out in NATS JetStream: subjects, headers, message ids, snapshots.

A bridge publishes every delivery of one engine (one `(worker_id, dp_rank)`) to the subject
`kve.v1.<model>.<worker_id>.<dp_rank>` of one stream (`KVEVENTS` by default). Each message
carries in its headers what it is (`Kve-Kind`), the stream's epoch (`Kve-Epoch`, one per
publisher instance the bridge followed) and the engine's seq (`Kve-Seq`). Four kinds:

- ``batch``: the engine's payload, byte for byte, as the engine published it;
- ``reset``: a new epoch begins (the engine restarted, or the bridge follows it anew): its
  stream starts empty at seq 0;
- ``lost``: seqs `Kve-First`..`Kve-Last` of the epoch will never be in the stream;
- ``snapshot``: the worker's whole block set was written to the object store (bucket
  `<stream>_SNAPSHOTS`, one object per worker, replaced each time); `Kve-Why` is
  ``periodic`` (nothing was missed: only a replica that is behind needs it) or ``resync``
  (the stream may lack what the snapshot holds: every replica loads it).

`Nats-Msg-Id` is `<worker_id>.<dp_rank>.<epoch>.<seq>` for a batch (and a marker's own id
for the others), so a batch published twice (a bridge retrying, or restarted on a publisher
instance it had already followed) is stored once within the stream's duplicate window; a
duplicate outside it is recognised by its epoch and seq. Nothing here imports NATS.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec

ROOT: Final = "kve.v1"
STREAM: Final = "KVEVENTS"
SNAPSHOT_FORMAT: Final = 1

KIND: Final = "Kve-Kind"
EPOCH: Final = "Kve-Epoch"
SEQ: Final = "Kve-Seq"
FIRST: Final = "Kve-First"
LAST: Final = "Kve-Last"
DIALECT: Final = "Kve-Dialect"
WHY: Final = "Kve-Why"
MSG_ID: Final = "Nats-Msg-Id"

BATCH, RESET, LOST, SNAPSHOT = "batch", "reset", "lost", "snapshot"
KINDS: Final = (BATCH, RESET, LOST, SNAPSHOT)
PERIODIC, RESYNC = "periodic", "resync"

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A subject token may hold any printable character but '.', '*', '>' and white space; '%' is
# escaped too so that the encoding reads back.
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-+=:@/,;!~^|]")


def check_stream_name(name: str) -> str:
    """The stream name, or ValueError: JetStream names (and the snapshot bucket named after
    them) allow letters, digits, '-' and '_'."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"stream name {name!r}: use 1-64 letters, digits, '-' or '_'")
    return name


def bucket_name(stream: str) -> str:
    return f"{check_stream_name(stream)}_SNAPSHOTS"


def model_token(model: str) -> str:
    """A model name as one subject token: characters a subject cannot hold are written
    `%XX` (so `Qwen2.5-7B` is `Qwen2%2E5-7B`), reversibly."""
    if not model:
        raise ValueError("a model name cannot be empty")
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), model)


def model_of_token(token: str) -> str:
    return re.sub(
        r"(?:%[0-9A-F]{2})+",
        lambda m: bytes.fromhex(m.group().replace("%", "")).decode("utf-8", "replace"),
        token,
    )


def check_root(root: str) -> str:
    """The subject root, or ValueError: dot-separated tokens of letters, digits, '-', '_'.
    Two streams on one server need two roots (JetStream refuses overlapping subjects)."""
    if not all(_NAME.fullmatch(token) for token in root.split(".")):
        raise ValueError(
            f"subject root {root!r}: dot-separated tokens of letters, digits, '-', '_'"
        )
    return root


def subject(model: str, worker_id: int, dp_rank: int, root: str = ROOT) -> str:
    return f"{root}.{model_token(model)}.{worker_id}.{dp_rank}"


def model_filter(model: str | None, root: str = ROOT) -> str:
    """The subjects of one model's workers (None: every model's)."""
    return f"{root}.>" if model is None else f"{root}.{model_token(model)}.>"


def parse_subject(name: str, root: str = ROOT) -> tuple[str, int, int]:
    """`(model, worker_id, dp_rank)`; ValueError for a subject that is not one of ours."""
    parts = name.split(".")
    if len(parts) < 4 or ".".join(parts[:-3]) != root:
        raise ValueError(f"not a kvevents subject under {root!r}: {name!r}")
    try:
        return model_of_token(parts[-3]), int(parts[-2]), int(parts[-1])
    except ValueError:
        raise ValueError(f"not a kvevents subject under {root!r}: {name!r}") from None


def snapshot_object(model: str, worker_id: int, dp_rank: int) -> str:
    return f"{model_token(model)}.{worker_id}.{dp_rank}"


def batch_id(worker_id: int, dp_rank: int, epoch: str, seq: int) -> str:
    return f"{worker_id}.{dp_rank}.{epoch}.{seq}"


def batch_headers(
    worker_id: int, dp_rank: int, epoch: str, seq: int, dialect: str
) -> dict[str, str]:
    return {
        MSG_ID: batch_id(worker_id, dp_rank, epoch, seq),
        KIND: BATCH,
        EPOCH: epoch,
        SEQ: str(seq),
        DIALECT: dialect,
    }


def reset_headers(worker_id: int, dp_rank: int, epoch: str) -> dict[str, str]:
    return {MSG_ID: f"{worker_id}.{dp_rank}.{epoch}.reset", KIND: RESET, EPOCH: epoch}


def lost_headers(
    worker_id: int, dp_rank: int, epoch: str, first: int, last: int, reason: str
) -> dict[str, str]:
    return {
        MSG_ID: f"{worker_id}.{dp_rank}.{epoch}.lost.{first}-{last}",
        KIND: LOST,
        EPOCH: epoch,
        FIRST: str(first),
        LAST: str(last),
        "Kve-Reason": reason[:200],
    }


def snapshot_headers(
    worker_id: int, dp_rank: int, epoch: str, seq: int, why: str, nonce: str
) -> dict[str, str]:
    # A snapshot marker is never a duplicate: the nonce tells two writes at one seq apart.
    return {
        MSG_ID: f"{worker_id}.{dp_rank}.{epoch}.snap.{seq}.{nonce}",
        KIND: SNAPSHOT,
        EPOCH: epoch,
        SEQ: str(seq),
        WHY: why,
    }


class SnapshotRecord(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """One worker's whole block set as the bridge knew it after seq `seq` of `epoch`.

    `payloads` are batches of BlockStored events in the engine's dialect (applying them to
    an empty state gives the worker's state); `covers` is a stream sequence at or past every
    message of this worker that the state includes, and before every one it does not, so a
    reader starts after it. `whole` False: the bridge itself lost part of the history
    (`reason`), and the state cannot be vouched for."""

    format: int = SNAPSHOT_FORMAT
    model: str
    worker_id: int
    dp_rank: int
    dialect: str
    epoch: str
    seq: int
    """The last seq included; -1 when none was (an empty stream)."""
    covers: int
    whole: bool
    reason: str | None = None
    written: float = 0.0
    """Wall-clock seconds when it was written (its age, for /health)."""
    payloads: list[bytes] = []


_encode_record = msgspec.msgpack.Encoder().encode
_decode_record = msgspec.msgpack.Decoder(SnapshotRecord).decode


def encode_snapshot(record: SnapshotRecord) -> bytes:
    return _encode_record(record)


def decode_snapshot(data: bytes) -> SnapshotRecord:
    """ValueError (msgspec's DecodeError) for bytes that are not a snapshot record; a
    record of a newer format is refused rather than misread."""
    record = _decode_record(data)
    if record.format != SNAPSHOT_FORMAT:
        raise ValueError(f"snapshot format {record.format} is not {SNAPSHOT_FORMAT}")
    return record
