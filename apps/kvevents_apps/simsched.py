"""One simulated worker's scheduler: vLLM's continuous batching as Dynamo's mocker models it.

A pass has a token budget (`max_num_batched_tokens`) and a job cap (`max_num_seqs`).
Running sequences are served first, in the order they were admitted: one decode token each,
or the next chunk of a prefill not yet finished; then waiting requests are admitted first
come, first served while the cap, the budget and the cache allow, each prefilling as much as
the budget leaves (chunked prefill). A pass lasts the prefill time of its new tokens plus the
decode time of the KV its scheduled sequences hold (Dynamo's polynomials, `TimingModel`); a
request's first token comes at the end of the pass that computes its last prompt chunk. A pass
in which nothing decodes (prefill chunks alone) takes the prefill time only.

Sans-IO: the engine (its cache and its events) and the clock are the caller's; a pass returns
what happened (first tokens, completions) so the caller can keep its own books (the router's
load, the statistics).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvevents.mock import TimingModel


class Engine(Protocol):
    """What the scheduler needs of an engine's cache (`kvevents.mock.MockEngine` has it)."""

    capacity: int

    def admit(
        self,
        tokens: Sequence[int],
        lora_name: str | None = None,
        hashes: list[int] | None = None,
    ) -> Any: ...

    def release(self, allocation: Any) -> None: ...


@dataclass(frozen=True)
class Budgets:
    """vLLM's (and Dynamo's mocker's) defaults."""

    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be at least 1")


@dataclass
class Job:
    ident: int
    arrival_ms: float
    tokens: Sequence[int]
    hashes: list[int]
    output_tokens: int
    allocation: Any = None
    cached_tokens: int = 0
    """Prompt tokens found in the cache at admission (whole blocks)."""
    prefill_left: int = 0
    decode_left: int = 0
    context: int = 0
    """Tokens whose KV this job holds (prompt computed or cached, plus decoded)."""
    admitted_ms: float | None = None


@dataclass
class PassResult:
    length_ms: float
    admitted: list[Job] = field(default_factory=list)
    first_tokens: list[Job] = field(default_factory=list)
    """Sequences whose first token came at the end of this pass."""
    finished: list[Job] = field(default_factory=list)
    oversized: list[Job] = field(default_factory=list)
    """Requests larger than the whole cache: served alone in this pass, nothing cached."""
    passes: int = 1
    """Passes this result stands for (an unchanged decode batch is advanced several at once)."""
    scheduled: int = 0
    """Sequences scheduled in each of those passes."""
    prefill_tokens: int = 0


class WorkerScheduler:
    def __init__(
        self,
        engine: Engine,
        block_size: int,
        timing: TimingModel | None = None,
        budgets: Budgets | None = None,
        fast_forward: bool = True,
    ) -> None:
        self.engine = engine
        self.block_size = block_size
        self.timing = timing or TimingModel()
        self.budgets = budgets or Budgets()
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.kv_tokens = engine.capacity * block_size
        self.fast_forward = fast_forward
        """Take an unchanged decode batch's passes together (False: one pass per step, the
        reference the fast path is checked against)."""

    def add(self, job: Job) -> None:
        self.waiting.append(job)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def step(self, now: float, next_arrival_ms: float = float("inf")) -> PassResult | None:
        """Run one pass starting at `now` (or several, when nothing but an unchanged decode
        batch would run before `next_arrival_ms`). None when there is nothing to do."""
        budget = self.budgets.max_num_batched_tokens
        result = PassResult(0.0)
        prefill = 0
        decoding = False
        scheduled: list[Job] = []
        for job in self.running:
            if budget <= 0:
                break
            if job.prefill_left:
                chunk = min(job.prefill_left, budget)
                job.prefill_left -= chunk
                job.context += chunk
                prefill += chunk
                budget -= chunk
            else:
                budget -= 1
                decoding = True
            scheduled.append(job)
        while self.waiting and budget > 0 and len(self.running) < self.budgets.max_num_seqs:
            job = self.waiting[0]
            allocation = self.engine.admit(job.tokens, hashes=job.hashes)
            if allocation is None:
                if not self.running and not scheduled:
                    return self._oversized(self.waiting.popleft(), now)
                break  # the cache is full of running sequences: wait for one to finish
            self.waiting.popleft()
            job.allocation = allocation
            # At least the last prompt token is computed (it yields the first token).
            job.cached_tokens = min(allocation.cached * self.block_size, len(job.tokens))
            job.context = min(job.cached_tokens, len(job.tokens) - 1)
            job.prefill_left = len(job.tokens) - job.context
            job.decode_left = job.output_tokens
            job.admitted_ms = now
            chunk = min(job.prefill_left, budget)
            job.prefill_left -= chunk
            job.context += chunk
            prefill += chunk
            budget -= chunk
            self.running.append(job)
            scheduled.append(job)
            result.admitted.append(job)
        if not scheduled:
            return None
        active = sum(s.context for s in scheduled)
        # A pass of prefill chunks alone costs no decode step (checked against Dynamo's
        # replay: charging one moved mean TTFT 3-6% above it, leaving it out within 2.5%).
        decode = self.timing.decode_ms(active / self.kv_tokens) if decoding else 0.0
        result.length_ms = self.timing.prefill_ms(prefill) + decode
        result.prefill_tokens = prefill
        result.scheduled = len(scheduled)
        passes = 1
        if (
            self.fast_forward
            and not prefill
            and not self.waiting
            and len(scheduled) == len(self.running)
        ):
            # An unchanged decode batch: the passes up to the first completion, or up to the
            # first that would start at or after the next arrival, taken together, each timed
            # as it would be alone (the KV grows by a token per sequence a pass).
            most = min(job.decode_left for job in scheduled)
            passes, result.length_ms = self.timing.decode_run(
                active, self.kv_tokens, len(scheduled), most, next_arrival_ms - now
            )
        result.passes = passes
        served = {id(s) for s in scheduled}
        still: list[Job] = []
        for job in self.running:
            if id(job) in served and not job.prefill_left:
                if job.decode_left == job.output_tokens:
                    result.first_tokens.append(job)
                    job.decode_left -= 1
                    job.context += 1
                else:
                    job.decode_left -= passes
                    job.context += passes
            if job.decode_left <= 0:
                self.engine.release(job.allocation)
                result.finished.append(job)
            else:
                still.append(job)
        self.running = still
        return result

    def _oversized(self, job: Job, now: float) -> PassResult:
        length = self.timing.prefill_ms(len(job.tokens))
        job.admitted_ms = now
        job.context = len(job.tokens)
        return PassResult(
            length,
            admitted=[job],
            first_tokens=[job],
            finished=[job],
            oversized=[job],
            scheduled=1,
            prefill_tokens=len(job.tokens),
        )
