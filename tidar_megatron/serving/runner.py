"""The engine's runner: a pass's inputs, the forward over the KV-cache rows, and the decoding calls.

Each sequence owns one cache row of `capacity` slots (max_model_len plus one decoding pass of scratch).
`prefill` runs a new sequence's prompt (for TiDAR with one mask block after it: `TiDARLayout.for_prefill`);
`decode` runs one pass for every given sequence at once, each with its own layout
(`TiDARLayout.for_decoding` at its own prefix) and mask.  Both advance the sequences' decoding state
(`scheduler.Sequence`: prefix, pending, draft_probs, seed, passes) and return, per sequence in the order
given, the tokens the pass made final; stop rules and text are the output processor's.  A pass calls the
decoding core (inference/step.py) once for all its sequences, greedy and sampled alike (each with its own
settings, seed and pass number as a row), and reads its results back with one host transfer.

The contract the engine relies on: `prefill(seqs)` and `decode(seqs)` change nothing of a sequence but
those five fields, and no cache slot before its prefix (a pass writes at and after it: scratch until
verified), so a call that raised can be run again, sequence by sequence, from `Sequence.snapshot`.
"""

from __future__ import annotations

import secrets
from typing import Callable

import torch

from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.sampling import RowSampling, one_hot_distributions
from tidar_megatron.inference.step import ar_step, new_tokens, prefill_select, tidar_step
from tidar_megatron.layout import TiDARLayout
from tidar_megatron.serving.scheduler import Sequence


class Runner:
    """Runs `decoder`'s model with its block size and beta; `on_forward` is called before every forward."""

    def __init__(self, decoder: Decoder, mode: str, max_batch: int, max_model_len: int,
                 on_forward: Callable[[], None] | None = None):
        self.decoder, self.model, self.mode, self.beta = decoder, decoder.model, mode, decoder.beta
        self.block = decoder.block_size if mode == "tidar" else 1
        self.device = decoder.device
        self.on_forward = on_forward
        # A pass's rows relative to its first, the prefix only shifts them (decoding.py's module docstring).
        self.step_layout = TiDARLayout.for_decoding(0, self.block) if mode == "tidar" else TiDARLayout.causal(1)
        self.pass_len = self.step_layout.seq_len
        self.capacity = max_model_len + self.pass_len  # cache slots per row
        decoder.model.setup_kv_cache(max_batch, self.capacity)
        if mode == "tidar":
            self.groups = self.step_layout.full_block_rows.to(self.device)  # [B, B] rows of group a - 1
            self.masks = [decoder.mask_token_id] * (self.step_layout.seq_len - self.step_layout.clean_len)

    def out_of_room(self, seq: Sequence) -> bool:
        """True when the sequence's next pass would not fit its cache row."""
        return seq.prefix + self.pass_len > self.capacity

    # --- decoding: prefill ------------------------------------------------------------------------------
    def prefill(self, seqs: list[Sequence]) -> list[list[int]]:
        """Prefill each new sequence's prompt into its row; returns each one's first token ([t])."""
        return [self._prefill_one(seq) for seq in seqs]

    def _prefill_one(self, seq: Sequence) -> list[int]:
        """One forward, one call of the decoding core (pass number 0), one host transfer."""
        request = seq.request
        prompt, n = request.prompt_ids, len(request.prompt_ids)
        if self.mode == "tidar":
            layout = TiDARLayout.for_prefill(n, self.block)
            tokens = prompt + self.masks[:layout.seq_len - layout.clean_len]
        else:
            layout, tokens = TiDARLayout.causal(n), prompt
        logits = self._forward([seq.row], [tokens], [layout], [0])
        # Each sequence draws from its own stream: its seed's, or one from entropy.
        seq.seed = request.seed if request.seed is not None else secrets.randbits(64)
        sampling = RowSampling.of([request.sampling], [seq.seed], self.device)
        counters = torch.zeros(1, dtype=torch.long, device=self.device)
        if self.mode == "tidar":
            first_block = logits[:, layout.full_block_rows[0].to(self.device)]
            result = prefill_select(logits[:, n - 1], first_block, self.beta, sampling, counters)
        else:
            result = ar_step(logits[:, n - 1], sampling, counters)
        _, new, seq.pending = new_tokens(None, result.packed.tolist()[0])
        seq.draft_probs = None if result.draft_probs is None else result.draft_probs[0]
        seq.prefix, seq.passes = n, 1
        return new

    # --- decoding: one pass -----------------------------------------------------------------------------
    def decode(self, seqs: list[Sequence]) -> list[list[int]]:
        """One pass for every sequence; returns the tokens it made final for each (TiDAR: the a accepted)."""
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].row)  # rows in order need no gather
        ordered = [seqs[i] for i in order]
        new = self._decode(ordered)
        result: list[list[int]] = [[] for _ in seqs]
        for i, tokens in zip(order, new):
            result[i] = tokens
        return result

    def _decode(self, seqs: list[Sequence]) -> list[list[int]]:
        """One forward over every sequence's row, one call of the decoding core, one host transfer."""
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
        new: list[list[int]] = []
        for i, (seq, row) in enumerate(zip(seqs, result.packed.tolist())):
            accepted, tokens, seq.pending = new_tokens(seq.pending, row)
            seq.passes, seq.prefix = seq.passes + 1, seq.prefix + accepted
            seq.draft_probs = None if result.draft_probs is None else result.draft_probs[i]
            new.append(tokens)
        return new

    def _forward(self, rows: list[int], tokens: list[list[int]], layouts: list[TiDARLayout], first: list[int]):
        """One forward over the given cache rows: logits [n, width, V] of each sequence's rows."""
        if self.on_forward is not None:
            self.on_forward()
        return self.decoder.forward_pass(self.decoder.padded(tokens), layouts, first, cache_rows=rows)
