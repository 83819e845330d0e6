"""The engine's scheduler: requests waiting for a KV-cache row, the sequences holding one, cancellation.

A bounded waiting queue gives back-pressure: `submit` raises `QueueFull` when `max_waiting` requests already
wait (the HTTP layer answers 503), rather than letting a burst grow the queue and every request's latency
without limit.  `submit` and `cancel` may be called from any thread; `schedule` and `finish` from the engine
thread only.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from tidar_megatron.errors import TiDARError
from tidar_megatron.inference.sampling import SamplingConfig

if TYPE_CHECKING:  # output.py imports this module
    from tidar_megatron.serving.output import SequenceOutput


class EngineStopped(TiDARError):
    """The engine no longer takes requests (it stopped, or failed)."""


class QueueFull(TiDARError):
    """The waiting queue is at max_waiting: the request was not taken (try again later)."""


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    on_event: Callable = print                       # called with each serving.output.Event
    id: int = field(default_factory=itertools.count().__next__)
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class Sequence:
    """A request holding a KV-cache row: the runner's decoding state and the output processor's."""
    request: Request
    row: int
    prefix: int = 0                           # cache slots [0, prefix) hold the verified tokens
    pending: list[int] = field(default_factory=list)  # TiDAR: the pending block; AR: the last token
    draft_probs: torch.Tensor | None = None   # TiDAR sampling: the drafts' distributions [B - 1, V]
    seed: int = 0                             # its random stream (the request's seed, or from entropy)
    passes: int = 1                           # the prefill counts; also the pass number its draws use
    output: SequenceOutput | None = None      # the output processor's state, made at the first output

    def snapshot(self) -> tuple:
        """The decoding state, to rerun a pass that failed (a pass writes only scratch cache slots; its random
        draws are a function of seed and pass number, so a rerun draws the same)."""
        return self.prefix, list(self.pending), self.draft_probs, self.seed, self.passes

    def restore(self, state: tuple):
        self.prefix, pending, self.draft_probs, self.seed, self.passes = state
        self.pending = list(pending)


class Scheduler:
    def __init__(self, max_batch: int, max_waiting: int):
        if max_waiting < 1:
            raise TiDARError(f"max_waiting must be >= 1, got {max_waiting}")
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.free_rows = list(range(max_batch))
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Sequence] = {}
        self.cancelled: set[int] = set()
        self.closed: str | None = None  # why submits are refused (drain)
        self.wake = threading.Condition()

    # --- from any thread ------------------------------------------------------------------------------
    def submit(self, request: Request) -> int:
        with self.wake:
            if self.closed:
                raise EngineStopped(f"the serving engine stopped ({self.closed}): restart the server")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"the engine's waiting queue is full ({self.max_waiting} requests, "
                                f"--max-waiting): retry later")
            self.waiting.append(request)
            self.wake.notify()
        return request.id

    def cancel(self, request_id: int):
        with self.wake:
            self.cancelled.add(request_id)
            self.wake.notify()

    @property
    def occupancy(self) -> int:
        return self.max_batch - len(self.free_rows)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.cancelled)

    # --- the engine thread ----------------------------------------------------------------------------
    def schedule(self) -> list[Sequence]:
        """Drop cancelled requests (their rows come back), then admit waiting ones into free rows; returns the
        admitted sequences (to prefill)."""
        with self.wake:
            cancelled, self.cancelled = self.cancelled, set()
            self.waiting = deque(r for r in self.waiting if r.id not in cancelled)
            for seq in [s for s in self.running.values() if s.request.id in cancelled]:
                self._free(seq)
            admitted = []
            while self.waiting and self.free_rows:
                seq = Sequence(self.waiting.popleft(), self.free_rows.pop(0))
                self.running[seq.request.id] = seq
                admitted.append(seq)
        return admitted

    def finish(self, seq: Sequence):
        """The sequence ended (finished, failed or cancelled): its row is free for the next admission."""
        with self.wake:
            self._free(seq)

    def drain(self, reason: str) -> list[Request]:
        """Every waiting and running request, removed; later submits raise EngineStopped (the engine is
        stopping: nothing would serve them)."""
        with self.wake:
            self.closed = reason
            requests = list(self.waiting) + [s.request for s in self.running.values()]
            self.waiting.clear()
            for seq in list(self.running.values()):
                self._free(seq)
        return requests

    def _free(self, seq: Sequence):
        if self.running.pop(seq.request.id, None) is not None:
            self.free_rows.append(seq.row)
            self.free_rows.sort()
