"""Continuous batching of TiDAR (or AR) decoding: sequences join and leave between forward passes.

The KV cache holds `max_batch` rows of `max_model_len` tokens (plus one decoding pass of scratch).  A
request waits until a row is free, is prefilled into it alone (the prompt, and for TiDAR one mask block:
`TiDARLayout.for_prefill`), and from then on takes part in every decoding pass with the other active
sequences: one forward over their rows, each with its own layout (`TiDARLayout.for_decoding` at its own
prefix length) and mask.  A sequence that finishes, or whose client goes away, frees its row before the
next pass.  Everything a sequence's tokens depend on is its own: its cache row, its prefix, its pending
block, its settings and random key (from the request's seed; pass k draws what `Decoder` draws at pass k for
that seed), so its output is what it would be decoded alone (token for token, sampled ones too, up to the
float rounding of a batched forward).  A pass calls the decoding core (inference/step.py) once for all of
them and reads its results back with one host transfer.

The engine runs in one background thread (`start`); `submit` and `cancel` may be called from any thread,
and a request's `on_event` is called from the engine thread after every pass that makes tokens final.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.sampling import RowSampling, SamplingConfig, one_hot_distributions
from tidar_megatron.inference.step import ar_step, clip_at_stop, new_tokens, prefill_select, tidar_step
from tidar_megatron.layout import TiDARLayout


@dataclass
class Event:
    """What one pass made final for a request."""
    tokens: list[int]            # the new final tokens
    text: str                    # the text they add (stop strings cut off)
    finish_reason: str | None    # None while generating, then "stop" (EOS or a stop string) or "length"
    usage: dict


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    on_event: Callable[[Event], None] = print
    id: int = field(default_factory=itertools.count().__next__)
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class _Sequence:
    request: Request
    row: int
    prefix: int                               # cache slots [0, prefix) hold the verified tokens
    pending: list[int]                        # TiDAR: the pending block; AR: the last token
    draft_probs: torch.Tensor | None          # TiDAR sampling: the drafts' distributions [B - 1, V]
    seed: int                                 # its random stream's seed (the request's, or from entropy)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    passes: int = 1                           # the prefill counts
    first_token_at: float | None = None


class Engine:
    """Serves `decoder`'s model with its block size, beta and EOS ids; `metrics`: a serving.metrics.Metrics."""

    def __init__(self, decoder: Decoder, tokenizer, mode: str = "tidar", max_batch: int = 8,
                 max_model_len: int = 2048, metrics=None):
        self.decoder, self.model, self.tokenizer = decoder, decoder.model, tokenizer
        self.mode, self.beta = mode, decoder.beta
        self.block = decoder.block_size if mode == "tidar" else 1
        self.max_batch, self.max_model_len = max_batch, max_model_len
        self.device = decoder.device
        self.eos = set(decoder.eos_token_ids)
        self.metrics = metrics
        # A pass's rows relative to its first, the prefix only shifts them (decoding.py's module docstring).
        self.step_layout = TiDARLayout.for_decoding(0, self.block) if mode == "tidar" else TiDARLayout.causal(1)
        self.capacity = max_model_len + self.step_layout.seq_len  # cache slots per row
        decoder.model.setup_kv_cache(max_batch, self.capacity)
        if mode == "tidar":
            self.groups = self.step_layout.full_block_rows.to(self.device)  # [B, B] rows of group a - 1
            self.masks = [decoder.mask_token_id] * (self.step_layout.seq_len - self.step_layout.clean_len)
        self.free_rows = list(range(max_batch))
        self.waiting: deque[Request] = deque()
        self.active: dict[int, _Sequence] = {}
        self.cancelled: set[int] = set()
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running = False

    # --- from any thread ------------------------------------------------------------------------------
    def submit(self, request: Request) -> int:
        with self.wake:
            self.waiting.append(request)
            self.wake.notify()
        return request.id

    def cancel(self, request_id: int):
        """Drop a request (its client went away); its row is freed before the next pass."""
        with self.wake:
            self.cancelled.add(request_id)
            self.wake.notify()

    @property
    def occupancy(self) -> int:
        return self.max_batch - len(self.free_rows)

    def start(self):
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="tidar-engine", daemon=True)
        self.thread.start()

    def stop(self):
        with self.wake:
            self.running = False
            self.wake.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    # --- the engine thread ------------------------------------------------------------------------------
    def _loop(self):
        with torch.inference_mode():
            while True:
                with self.wake:
                    while self.running and not (self.waiting or self.active or self.cancelled):
                        self.wake.wait()
                    if not self.running:
                        self._fail_all("the server is shutting down")
                        return
                try:
                    self.step()
                except Exception as e:  # a failed pass (out of memory, say) ends its requests, not the server
                    self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, reason: str):
        """End every admitted and waiting request with finish_reason "error" and free their rows."""
        with self.wake:
            waiting, self.waiting = list(self.waiting), deque()
        for seq in list(self.active.values()):
            self._finish(seq)
            waiting.append(seq.request)
        for request in waiting:
            request.on_event(Event([], "", "error", {"error": reason}))

    def step(self):
        """Drop cancelled requests, admit waiting ones into free rows, then one pass for every active one."""
        with self.wake:
            cancelled, self.cancelled = self.cancelled, set()
            self.waiting = deque(r for r in self.waiting if r.id not in cancelled)
            admitted = []
            while self.waiting and self.free_rows:
                admitted.append((self.waiting.popleft(), self.free_rows.pop(0)))
        for seq in [s for s in self.active.values() if s.request.id in cancelled]:
            self._finish(seq)
        for i, (request, row) in enumerate(admitted):
            try:
                self._prefill(request, row)
            except Exception as e:  # this request fails; the ones admitted after it wait again
                with self.wake:
                    self.free_rows = sorted(self.free_rows + [r for _, r in admitted[i:]])
                    self.waiting.extendleft(req for req, _ in reversed(admitted[i + 1:]))
                request.on_event(Event([], "", "error", {"error": f"{type(e).__name__}: {e}"}))
                raise
        if self.active:
            self._decode(list(self.active.values()))
        if self.metrics is not None:
            self.metrics.observe_engine(self)

    def _prefill(self, request: Request, row: int):
        """Prefills one request into cache row `row` and emits its first token: one forward, one call of the
        decoding core, one host transfer."""
        prompt, n = request.prompt_ids, len(request.prompt_ids)
        if self.mode == "tidar":
            layout = TiDARLayout.for_prefill(n, self.block)
            tokens = prompt + self.masks[:layout.seq_len - layout.clean_len]
        else:
            layout, tokens = TiDARLayout.causal(n), prompt
        logits = self._forward([row], [tokens], [layout], [0])
        # Each sequence draws from its own stream: its seed's, or one from entropy.
        seed = request.seed if request.seed is not None else secrets.randbits(64)
        sampling = RowSampling.of([request.sampling], [seed], self.device)
        counters = torch.zeros(1, dtype=torch.long, device=self.device)
        if self.mode == "tidar":
            first_block = logits[:, layout.full_block_rows[0].to(self.device)]
            result = prefill_select(logits[:, n - 1], first_block, self.beta, sampling, counters)
        else:
            result = ar_step(logits[:, n - 1], sampling, counters)
        _, new, pending = new_tokens(None, result.packed.tolist()[0])
        probs = None if result.draft_probs is None else result.draft_probs[0]
        seq = _Sequence(request, row, n, pending, probs, seed)
        self.active[request.id] = seq
        self._emit(seq, new)

    def _decode(self, seqs: list[_Sequence]):
        """One pass for every active sequence, greedy and sampled alike: one forward, one call of the
        decoding core with each sequence's settings, key and pass number as a row, one host transfer."""
        seqs = sorted(seqs, key=lambda s: s.row)  # rows 0..n-1 in order need no gather from the cache
        if self.mode == "tidar":
            layouts = [TiDARLayout.for_decoding(s.prefix, self.block) for s in seqs]
            tokens = [s.pending + self.masks for s in seqs]
        else:
            layouts = [TiDARLayout.causal(s.prefix + 1) for s in seqs]
            tokens = [s.pending for s in seqs]
        logits = self._forward([s.row for s in seqs], tokens, layouts, [s.prefix for s in seqs])
        sampling = RowSampling.of([s.request.sampling for s in seqs], [s.seed for s in seqs], self.device)
        counters = torch.tensor([s.passes for s in seqs], device=self.device)
        if self.mode == "tidar":
            pending = torch.tensor([s.pending for s in seqs], device=self.device)
            probs = None
            if not sampling.all_greedy:  # greedy sequences' drafts are certain: one-hot distributions
                vocab = logits.shape[-1]
                probs = torch.stack([s.draft_probs if s.draft_probs is not None
                                     else one_hot_distributions(pending[i, 1:], vocab) for i, s in enumerate(seqs)])
            result = tidar_step(logits, pending, probs, self.groups, self.beta, sampling, counters)
        else:
            result = ar_step(logits[:, 0], sampling, counters)
        for i, (seq, row) in enumerate(zip(seqs, result.packed.tolist())):
            accepted, new, pending = new_tokens(seq.pending, row)
            if self.metrics is not None and self.mode == "tidar":
                self.metrics.accepted(accepted)
            seq.passes, seq.prefix, seq.pending = seq.passes + 1, seq.prefix + accepted, pending
            seq.draft_probs = None if result.draft_probs is None else result.draft_probs[i]
            self._emit(seq, new)

    def _forward(self, rows: list[int], tokens: list[list[int]], layouts: list[TiDARLayout], first: list[int]):
        """One forward over the given cache rows: logits [n, width, V] of each sequence's rows."""
        if self.metrics is not None:
            self.metrics.forward_pass()
        return self.decoder.forward_pass(self.decoder.padded(tokens), layouts, first, cache_rows=rows)

    # --- making tokens final ---------------------------------------------------------------------------
    def _emit(self, seq: _Sequence, tokens: list[int]):
        request = seq.request
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
            if self.metrics is not None:
                self.metrics.first_token(seq.first_token_at - request.arrived)
        tokens, finish = clip_at_stop(tokens, request.max_tokens - len(seq.generated), self.eos)
        seq.generated += tokens
        shown = [t for t in seq.generated if t not in self.eos]  # the completion's text leaves out EOS
        text = self.tokenizer.decode(shown) if self.tokenizer is not None else ""
        for stop in request.stop:
            cut = text.find(stop)
            if stop and cut >= 0:
                text, finish = text[:cut], "stop"
        if finish is None and seq.prefix + self.step_layout.seq_len > self.capacity:
            finish = "length"  # only reached by callers that skip the API's length check
        if finish is None:  # hold back what a stop string or a half-decoded character may still change
            text = _settled(text, request.stop)
        delta = text[len(seq.text):] if text.startswith(seq.text) else ""
        seq.text = text if text.startswith(seq.text) else seq.text
        usage = {"prompt_tokens": len(request.prompt_ids), "completion_tokens": len(seq.generated),
                 "total_tokens": len(request.prompt_ids) + len(seq.generated), "forward_passes": seq.passes,
                 "tokens_per_pass": len(seq.generated) / seq.passes}
        if finish is not None:
            self._finish(seq)
            if self.metrics is not None:
                self.metrics.finished(usage, time.perf_counter() - request.arrived)
        request.on_event(Event(tokens, delta, finish, usage))

    def _finish(self, seq: _Sequence):
        if self.active.pop(seq.request.id, None) is not None:
            with self.wake:
                self.free_rows.append(seq.row)
                self.free_rows.sort()


def _settled(text: str, stops: list[str]) -> str:
    """`text` without a tail that could still turn into a stop string or is an incomplete character."""
    keep = len(text)
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = min(keep, len(text) - n)
                break
    while keep and text[keep - 1] == "\ufffd":
        keep -= 1
    return text[:keep]
