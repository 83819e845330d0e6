"""Continuous batching of TiDAR (or AR) decoding: sequences join and leave between forward passes.

Three parts, as vLLM's EngineCore splits them, composed by `Engine.step`:

    scheduler.py  admission into the KV cache's `max_batch` rows, cancellation, a bounded waiting queue
    runner.py     the Decoder's passes over the rows: prefill, one decoding pass (one core call each)
    output.py     stop rule, incremental detokenization, stop strings, usage, finishing

A request waits until a row is free, is prefilled into it, and from then on takes part in every decoding
pass with the other active sequences.  A sequence that finishes, or whose client goes away, frees its row
before the next pass.  Everything a sequence's tokens depend on is its own: its cache row, its prefix, its
pending block, its settings and random stream (the request's seed; pass k draws what `Decoder` draws at pass k
with `seed=[s]`), so its output is what it would be decoded alone (token for token, sampled ones too, up to the
float rounding of a batched forward).

Faults stay with their sequence: a pass that raises is run again sequence by sequence from their snapshots,
and only the sequences whose own pass still raises end, with finish_reason "error"; a failed prefill ends
only its request.  The engine runs in one background thread (`start`); `submit` (which raises
scheduler.QueueFull when `max_waiting` requests wait) and `cancel` may be called from any thread, and a
request's `on_event` is called from the engine thread after every pass that makes tokens final.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Callable

import torch

from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.serving.block_policy import BlockPolicy
from tidar_megatron.serving.output import Event, OutputProcessor
from tidar_megatron.serving.runner import Runner
from tidar_megatron.serving.scheduler import EngineStopped, QueueFull, Request, Scheduler, Sequence

__all__ = ["Engine", "EngineStopped", "Event", "QueueFull", "Request"]


class Engine:
    """Serves `decoder`'s model with its block size, beta and EOS ids; `metrics`: a serving.metrics.Metrics.
    `block_policy`: the draft block of each pass by load (block_policy.py; the server's default is auto,
    the engine's off)."""

    def __init__(self, decoder: Decoder, tokenizer, mode: str = "tidar", max_batch: int = 8,
                 max_model_len: int = 2048, metrics=None, max_waiting: int = 1024,
                 block_policy: BlockPolicy = BlockPolicy("off")):
        self.decoder, self.model, self.tokenizer = decoder, decoder.model, tokenizer
        self.mode, self.max_batch, self.max_model_len = mode, max_batch, max_model_len
        self.metrics = metrics
        self.scheduler = Scheduler(max_batch, max_waiting)
        self.runner = Runner(decoder, mode, max_batch, max_model_len, self._forward_pass, block_policy)
        self.output = OutputProcessor(tokenizer, decoder.eos_token_ids)
        self.block = self.runner.block
        self.thread: threading.Thread | None = None
        self.running = False
        self.failed: str | None = None  # why the engine thread stopped on a fault of its own

    # --- from any thread ------------------------------------------------------------------------------
    def submit(self, request: Request) -> int:
        """Queue a request; raises QueueFull when max_waiting requests already wait, EngineStopped once the
        engine has stopped or failed (checked under the scheduler's lock, so no request is left behind)."""
        return self.scheduler.submit(request)

    def cancel(self, request_id: int):
        """Drop a request (its client went away); its row is freed before the next pass."""
        self.scheduler.cancel(request_id)

    @property
    def occupancy(self) -> int:
        return self.scheduler.occupancy

    @property
    def waiting(self):
        return self.scheduler.waiting

    def start(self):
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="tidar-engine", daemon=True)
        self.thread.start()

    def stop(self):
        with self.scheduler.wake:
            self.running = False
            self.scheduler.wake.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    # --- the engine thread ------------------------------------------------------------------------------
    def _loop(self):
        wake = self.scheduler.wake
        with torch.inference_mode():
            while True:
                with wake:
                    while self.running and not self.scheduler.has_work():
                        wake.wait()
                    if not self.running:
                        self._end_all("the server is shutting down")
                        return
                try:
                    self.step()
                except Exception as e:  # a fault of the engine itself, not of a request (those end alone)
                    traceback.print_exc()
                    self.failed, self.running = f"{type(e).__name__}: {e}", False
                    self._end_all(f"the serving engine failed: {self.failed}")
                    return

    def _end_all(self, reason: str):
        for request in self.scheduler.drain(reason):
            self._send(request, Event([], "", "error", {"error": reason}))

    def step(self):
        """Drop cancelled requests, admit and prefill waiting ones, then one pass for every active sequence."""
        admitted = self.scheduler.schedule()
        if admitted:
            for seq, tokens in self._isolating_faults(self.runner.prefill, admitted):
                self._output(seq, tokens)
        active = list(self.scheduler.running.values())
        if active:
            for seq, tokens in self._isolating_faults(self.runner.decode, active):
                event = self._output(seq, tokens)
                if self.metrics is not None and self.mode == "tidar" and event is not None:
                    self.metrics.accepted(len(event.tokens))  # after the stop rule: what the request got
        if self.metrics is not None:
            self.metrics.observe_engine(self)

    def _isolating_faults(self, run: Callable[[list[Sequence]], list[list[int]]], seqs: list[Sequence]):
        """`run(seqs)` as [(seq, its new tokens)]; when it raises, each sequence is run again alone from its
        snapshot, and one that still raises ends with an error while the others go on."""
        saved = [seq.snapshot() for seq in seqs]
        try:
            return list(zip(seqs, run(seqs)))
        except Exception as e:
            for seq, state in zip(seqs, saved):
                seq.restore(state)
            if len(seqs) == 1:
                self._fail(seqs[0], e)
                return []
        return [result for seq in seqs for result in self._isolating_faults(run, [seq])]

    def _output(self, seq: Sequence, tokens: list[int]) -> Event | None:
        """The pass's event for the sequence, sent (None when the output processor failed on it)."""
        request = seq.request
        first = seq.output is None
        try:
            event = self.output.process(seq, tokens, self.runner.out_of_room(seq))
        except Exception as e:  # a tokenizer that cannot decode this sequence's tokens, say
            self._fail(seq, e)
            return None
        if self.metrics is not None and first:
            self.metrics.first_token(seq.output.first_token_at - request.arrived)
        if event.finish_reason is not None:
            self.scheduler.finish(seq)
            if self.metrics is not None:
                self.metrics.finished(event.usage, time.perf_counter() - request.arrived)
        if not self._send(request, event):
            self.scheduler.finish(seq)
        return event

    def _fail(self, seq: Sequence, error: BaseException):
        self.scheduler.finish(seq)
        self._send(seq.request, Event([], "", "error", {"error": f"{type(error).__name__}: {error}"}))

    @staticmethod
    def _send(request: Request, event: Event) -> bool:
        """Deliver an event; False when the request's callback raised (its receiver is gone)."""
        try:
            request.on_event(event)
            return True
        except Exception:
            return False

    def _forward_pass(self, block: int | None, sequences: int):
        if self.metrics is not None:
            self.metrics.forward_pass(block if self.mode == "tidar" else None, sequences)
