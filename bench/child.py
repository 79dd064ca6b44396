"""One measurement in a fresh process (spawn), so no other measurement's memory, threads or
imports are counted: the child gets a pipe end as its last argument and sends one dict."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any


def run_in_child(
    target: Callable[..., None], args: tuple[Any, ...], timeout: float, what: str
) -> dict[str, Any]:
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe()
    process = spawn.Process(target=target, args=(*args, child), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"{what} took over {timeout:g} s")
        result: dict[str, Any] = parent.recv()
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    return result
