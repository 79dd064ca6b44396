"""NVIDIA Dynamo 1.6.1 (the ai-dynamo-runtime wheel), unpacked once beside the wheel cache,
for side-by-side measurements and hash checks. Its compiled core needs nothing from its
dependency list for what is used here: `compute_block_hash_for_seq`, `RadixTree` and
`python -m dynamo.indexer`."""

from __future__ import annotations

import sys
import types
import zipfile
from pathlib import Path

from .references import CACHE, Reference, ReferenceUnavailable, fetch_wheel

DYNAMO = Reference("Dynamo 1.6.1", "ai-dynamo-runtime==1.6.1", "dynamo/llm/__init__.py")
UNPACKED = CACHE.parent / "dynamo-1.6.1"


def path() -> Path:
    """The folder to put on sys.path (or PYTHONPATH) to import `dynamo`."""
    marker = UNPACKED / ".complete"
    if not marker.exists():
        wheel = fetch_wheel(DYNAMO)
        try:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(UNPACKED)
        except (OSError, zipfile.BadZipFile) as exc:
            raise ReferenceUnavailable(f"{wheel.name} could not be unpacked: {exc}") from None
        marker.touch()
    return UNPACKED


def llm() -> types.ModuleType:
    """`dynamo.llm`, imported from the unpacked wheel."""
    folder = str(path())
    if folder not in sys.path:
        sys.path.append(folder)
    try:
        import dynamo.llm as module
    except ImportError as exc:
        raise ReferenceUnavailable(f"dynamo.llm could not be imported: {exc}") from None
    return module
