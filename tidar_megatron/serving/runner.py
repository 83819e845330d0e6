"""The engine's runner: the decoding passes of the sequences holding KV-cache rows.

Each sequence owns one cache row of `capacity` slots (max_model_len plus one decoding pass of scratch).
`prefill` runs new sequences' prompts and `decode` one pass for every given sequence at once, each at its own
prefix, through the Decoder's `prefill` / `step` (the same passes `Decoder.stream` runs).  Both advance the
sequences' decoding state (`scheduler.Sequence`: prefix, pending, draft_probs, seed, passes) and return, per
sequence in the order given, the tokens the pass made final; stop rules and text are the output processor's.
A forward calls the decoding core (inference/step.py) once for all its sequences, greedy and sampled alike
(each with its own settings, seed and pass number as a row), and reads its results back with one host
transfer.  A pass is one forward, or two when seeded sampled sequences keep the checkpoint's draft block
while the others take the smaller one the load calls for (block_policy.py).

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
from tidar_megatron.inference.step import new_tokens
from tidar_megatron.layout import TiDARLayout
from tidar_megatron.serving.block_policy import BlockPolicy, pass_rows
from tidar_megatron.serving.scheduler import Sequence


class Runner:
    """Runs `decoder`'s model with its block size and beta; `on_forward(block, sequences)` is called before
    every forward (block None for a prefill)."""

    def __init__(self, decoder: Decoder, mode: str, max_batch: int, max_model_len: int,
                 on_forward: Callable[[int | None, int], None] | None = None,
                 block_policy: BlockPolicy = BlockPolicy("off")):
        self.decoder, self.model, self.mode, self.beta = decoder, decoder.model, mode, decoder.beta
        self.block = decoder.block_size if mode == "tidar" else 1
        self.device = decoder.device
        self.policy = block_policy.for_checkpoint(self.block, self.device.type) if mode == "tidar" \
            else BlockPolicy("off")
        self.on_forward = on_forward
        self._rows: dict[tuple, RowSampling] = {}  # the RowSampling of the last passes' batches
        # The cache slots one decoding pass writes from a sequence's prefix on (scratch until verified).
        self.pass_len = pass_rows(self.block) if mode == "tidar" else TiDARLayout.causal(1).seq_len
        self.capacity = max_model_len + self.pass_len  # cache slots per row
        decoder.model.setup_kv_cache(max_batch, self.capacity)
        self.prefill_tokens = max(self.capacity, 8192)  # padded tokens of one prefill forward (one prompt fits)

    def out_of_room(self, seq: Sequence) -> bool:
        """True when the sequence's next pass would not fit its cache row."""
        return seq.prefix + self.pass_len > self.capacity

    def prefill(self, seqs: list[Sequence]) -> list[list[int]]:
        """Prefill the new sequences' prompts into their rows, shortest first, as few forwards as the token
        budget allows (`prefill_tokens` padded tokens each: a batch of long prompts would otherwise build
        masks and logits of batch x longest x ...); returns each one's first token ([t])."""
        for seq in seqs:  # each sequence draws from its own stream: its seed's, or one from entropy
            seq.seed = seq.request.seed if seq.request.seed is not None else secrets.randbits(64)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].request.prompt_ids))
        new: list[list[int]] = [[] for _ in seqs]
        chunk: list[int] = []
        for i in order + [None]:
            width = len(seqs[i].request.prompt_ids) + self.block if i is not None else 0
            if chunk and (i is None or (len(chunk) + 1) * width > self.prefill_tokens):
                for j, tokens in zip(chunk, self._prefill([seqs[j] for j in chunk])):
                    new[j] = tokens
                chunk = []
            if i is not None:
                chunk.append(i)
        return new

    def _prefill(self, seqs: list[Sequence]) -> list[list[int]]:
        self._count_forward(None, len(seqs))
        result = self.decoder.prefill([s.request.prompt_ids for s in seqs], self.mode, self.block,
                                      self._sampling(seqs), self.beta, cache_rows=[s.row for s in seqs])
        new = []
        for i, (seq, row) in enumerate(zip(seqs, result.packed.tolist())):
            _, tokens, seq.pending = new_tokens(None, row)
            seq.draft_probs = None if result.draft_probs is None else result.draft_probs[i]
            seq.prefix, seq.passes = len(seq.request.prompt_ids), 1
            new.append(tokens)
        return new

    def decode(self, seqs: list[Sequence]) -> list[list[int]]:
        """One pass for every sequence; returns the tokens it made final for each (TiDAR: the a accepted).

        The block comes from the policy (`block_policy.py`), except for seeded sampled sequences, which keep
        the checkpoint's so that their tokens are the ones they get alone; when both kinds are in the batch
        they run as two forwards, one per block."""
        pinned = [s.request.seed is not None and not s.request.sampling.greedy for s in seqs]
        block = self.block_for(len(seqs), sum(pinned))
        blocks = [self.block if p else block for p in pinned]
        result: list[list[int]] = [[] for _ in seqs]
        for b in sorted(set(blocks), reverse=True):
            part = sorted((i for i in range(len(seqs)) if blocks[i] == b), key=lambda i: seqs[i].row)
            for i, tokens in zip(part, self._decode([seqs[i] for i in part], b)):  # rows in order: no gather
                result[i] = tokens
        return result

    def block_for(self, active: int, pinned: int = 0) -> int:
        """The draft block of a pass over `active` sequences, `pinned` of them at the checkpoint's (the
        policy's; AR: 1)."""
        return self.policy.block(active, self.block, pinned)

    def _decode(self, seqs: list[Sequence], block: int) -> list[list[int]]:
        sampling = self._sampling(seqs)
        if self.mode == "tidar":
            for seq in seqs:
                fit_pending(seq, block, self.model.args.vocab_size)
        pending = torch.tensor([s.pending for s in seqs], device=self.device)
        probs = None
        if self.mode == "tidar" and not sampling.all_greedy:  # greedy drafts are certain: one-hot distributions
            vocab = self.model.args.vocab_size
            probs = torch.stack([s.draft_probs if s.draft_probs is not None
                                 else one_hot_distributions(pending[i, 1:], vocab) for i, s in enumerate(seqs)])
        counters = torch.tensor([s.passes for s in seqs], device=self.device)
        self._count_forward(block, len(seqs))
        # Not the compiled model: the engine's batches change size from pass to pass.
        result = self.decoder.step(pending, [s.prefix for s in seqs], self.mode, block, sampling, counters,
                                   probs, self.beta, cache_rows=[s.row for s in seqs], compiled=False)
        new: list[list[int]] = []
        for i, (seq, row) in enumerate(zip(seqs, result.packed.tolist())):
            accepted, tokens, seq.pending = new_tokens(seq.pending, row)
            seq.passes, seq.prefix = seq.passes + 1, seq.prefix + accepted
            seq.draft_probs = None if result.draft_probs is None else result.draft_probs[i]
            new.append(tokens)
        return new

    def _sampling(self, seqs: list[Sequence]) -> RowSampling:
        """The rows' settings and keys on the device; kept while the batch stays the same (most passes), as
        building them costs a few host-to-device copies per pass."""
        key = tuple((s.request.id, s.seed) for s in seqs)
        if key not in self._rows:
            if len(self._rows) >= 2:  # a pass has at most two batches (one per block)
                self._rows.clear()
            self._rows[key] = RowSampling.of([s.request.sampling for s in seqs], [s.seed for s in seqs], self.device)
        return self._rows[key]

    def _count_forward(self, block: int | None, sequences: int):
        if self.on_forward is not None:
            self.on_forward(block, sequences)


def fit_pending(seq: Sequence, block: int, vocab: int):
    """The sequence's pending block (its verified token and drafts) made `block` long for a pass of that block.

    Fewer drafts: the first ones, with their distributions.  More: the last draft repeated, proposed with
    certainty (a one-hot distribution).  Speculative sampling keeps the target distribution for any proposal,
    a certain one included, and greedy verification keeps the AR argmax, so a pass's block may change from
    pass to pass without changing what is decoded; only how many drafts are accepted.
    """
    have = len(seq.pending)
    if have >= block:
        seq.pending = seq.pending[:block]
        if seq.draft_probs is not None:
            seq.draft_probs = seq.draft_probs[:block - 1]
        return
    extra = [seq.pending[-1]] * (block - have)
    if seq.draft_probs is not None:
        certain = one_hot_distributions(torch.tensor(extra, device=seq.draft_probs.device), vocab)
        seq.draft_probs = torch.cat([seq.draft_probs, certain])
    seq.pending = seq.pending + extra
