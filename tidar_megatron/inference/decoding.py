"""TiDAR self-speculative decoding, and plain AR decoding with the same model and KV cache code.

State of one sequence between passes: the KV cache holds the verified prefix, cache slots [0, m); the pending
block c_0..c_{B-1} sits at positions m..m+B-1, c_0 verified, c_1.. drafts.  A TiDAR pass runs
`TiDARLayout.for_decoding(m, B)`: the pending block (causal, the AR half) and one block of B mask tokens per
acceptance length a = 1..B.  The AR logits verify the drafts (greedy or rejection sampling); the next verified
token t follows the a kept tokens; the next drafts come from mask block a, which saw exactly the kept tokens.

Cache slot == layout index: a pass writes its tokens' keys and values at slots m, m+1, ..., so the kept tokens'
entries (computed with their exact causal prefix) are already in place and everything after them is scratch
that the next pass overwrites.  Nothing is copied or rolled back.

The prompt is prefilled together with one mask block right after it: its AR logits give the first token and
the block gives the first drafts, so decoding starts in the same state as after any other pass.

Verification (the paper's beta, section 3.3): the token at each position is chosen from
beta * AR logits + (1 - beta) * diffusion logits, the diffusion logits being slot 0 of the mask block that
starts at that position (it saw exactly the tokens before it).  beta = 1 ("Trust AR", the default) is
lossless: greedy TiDAR output equals greedy AR output, and sampling keeps the AR distribution.  beta < 1
("Trust Diff" at 0) changes the target: greedy output follows the mixed logits and sampling draws from
softmax(mixed / T), not from the AR model.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from tidar_megatron.errors import TiDARError
from tidar_megatron.inference.hf_checkpoint import load_hf_model
from tidar_megatron.inference.model import Transformer
from tidar_megatron.inference.sampling import RowSampling, SamplingConfig
from tidar_megatron.inference.step import (PassResult, ar_step, check_context, clip_at_stop, new_tokens,
                                           prefill_select, tidar_step)
from tidar_megatron.layout import TiDARLayout

MODES = ("tidar", "ar")
ATTENTION = ("sdpa", "kernel")


class DecodingError(TiDARError, ValueError):
    """Decoding settings or prompts that cannot work (a one-line message naming the fix)."""


def pass_inputs(layouts: list[TiDARLayout], first_rows: list[int], width: int, num_keys: int):
    """Positions, cache slots and attention mask for rows [first_row, seq_len) of each sequence's layout.

    Returns positions [b, width], cache_slots [b, width], mask [b, width, num_keys] (True = may attend).
    Rows past a layout's end pad a shorter prompt in a batched prefill: they attend only to their own
    (scratch) slot, so every cached value stays finite.
    """
    b = len(layouts)
    positions = torch.zeros(b, width, dtype=torch.long)
    slots = torch.tensor(first_rows)[:, None] + torch.arange(width)
    mask = torch.zeros(b, width, num_keys, dtype=torch.bool)
    keys = torch.arange(num_keys)
    rows_of = {}  # sequences in the same state share their rows (large batches of one prompt)
    for i, (layout, first) in enumerate(zip(layouts, first_rows)):
        if (layout, first) not in rows_of:
            rows = torch.arange(first, layout.seq_len)
            rows_of[layout, first] = (layout.position_ids[first:], layout.allowed(rows[:, None], keys[None, :]))
        row_positions, row_mask = rows_of[layout, first]
        n = len(row_positions)
        positions[i, :n], mask[i, :n] = row_positions, row_mask
        pad = torch.arange(n, width)
        mask[i, pad, first + pad] = True
    return positions, slots, mask


def _check_kernel_usable(model: Transformer, compile: bool):
    """attention='kernel' problems as one-line errors before any decoding, not at the first pass."""
    from tidar_kernels.tidar_attention import unsupported

    if compile:
        raise DecodingError("attention='kernel' does not run under compile yet: choose one of them")
    if problem := unsupported(model.args.head_dim, model.lm_head.weight.device.type):
        raise DecodingError(f"attention='kernel': {problem}; use attention='sdpa'")


def check_beta(beta: float) -> float:
    if not 0.0 <= beta <= 1.0:
        raise DecodingError(f"beta must be in [0, 1] (1 = trust AR, 0 = trust the diffusion drafts), got {beta}")
    return beta


@dataclass
class DecodeStats:
    mode: str
    block_size: int
    new_tokens: int = 0
    forward_passes: int = 0      # NFE, the prefill included
    sequence_passes: int = 0     # passes summed over the sequences still generating (== NFE at batch 1)
    seconds: float = 0.0
    acceptance_histogram: list[int] = field(default_factory=list)  # [a - 1]: passes that kept a tokens

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """T/NFE per sequence."""
        return self.new_tokens / self.sequence_passes if self.sequence_passes else 0.0

    def summary(self) -> str:
        hist = " ".join(f"{a}:{n}" for a, n in enumerate(self.acceptance_histogram, 1) if n)
        return (f"mode={self.mode} new_tokens={self.new_tokens} passes={self.forward_passes} "
                f"tokens/s={self.tokens_per_second:.1f} T/NFE={self.tokens_per_pass:.2f}"
                + (f" accepted-per-pass histogram {{{hist}}}" if self.mode == "tidar" else ""))


@dataclass
class StreamStep:
    new_tokens: list[list[int]]   # per sequence, the tokens this pass made final (empty once finished)
    cached_lengths: list[int]     # per sequence, cache slots [0, n) hold the verified prefix's KV
    stats: DecodeStats


@dataclass
class Generation:
    tokens: list[list[int]]
    stats: DecodeStats


class _StopRule:
    """Clips each sequence at its max_new_tokens and after its first EOS."""

    def __init__(self, batch_size: int, max_new_tokens: list[int], eos_token_ids):
        self.max_new_tokens, self.eos = max_new_tokens, set(eos_token_ids)
        self.generated = [0] * batch_size
        self.finished = [False] * batch_size

    def commit(self, i: int, tokens: list[int]) -> list[int]:
        if self.finished[i]:
            return []
        tokens, finish = clip_at_stop(tokens, self.max_new_tokens[i] - self.generated[i], self.eos)
        self.generated[i] += len(tokens)
        self.finished[i] = finish is not None
        return tokens


class Decoder:
    """Batch decoding with one model; one `stream` / `generate` at a time (they share the model's KV cache).

    `compile` (CUDA only): decoding steps run under torch.compile with CUDA graphs; prefill stays eager.
    `attention`: "sdpa" (torch SDPA with the layout's dense mask) or "kernel" (the TiDAR Triton kernel,
    which skips the masked tiles; used for passes where every sequence of the batch is at the same point,
    e.g. batch 1, and SDPA otherwise).
    """

    def __init__(self, model: Transformer, mask_token_id: int | None = None, block_size: int | None = None,
                 eos_token_ids=(), compile: bool = False, attention: str = "sdpa", beta: float = 1.0):
        if attention not in ATTENTION:
            raise DecodingError(f"attention must be one of {ATTENTION}, got {attention!r}")
        check_beta(beta)
        self.beta = beta
        if attention == "kernel":
            _check_kernel_usable(model, compile)
        self.model, self.mask_token_id, self.block_size = model, mask_token_id, block_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.attention = attention
        self.device = model.lm_head.weight.device
        self.compiled = compile and self.device.type == "cuda"
        self._step_model = model if not self.compiled else \
            torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
        # Compiled decoding steps attend over the whole cache so that every step has the same shapes (CUDA
        # graphs replay fixed shapes); eager steps attend only to the keys a pass can see.
        self.attend_whole_cache = self.compiled
        self.checkpoint_config = None  # the HFConfig read by from_pretrained
        self._step_tables: dict[int, tuple[torch.Tensor, int]] = {}  # block -> _step_rows

    @classmethod
    def from_pretrained(cls, model_dir, dtype=torch.float32, device="cpu", mask_token_id=None, block_size=None,
                        compile=False, attention="sdpa", beta: float = 1.0) -> "Decoder":
        """Explicit mask_token_id / block_size override the checkpoint's tidar_* config fields; the config read
        stays at `checkpoint_config`."""
        model, hf = load_hf_model(model_dir, dtype, device)
        decoder = cls(model, mask_token_id if mask_token_id is not None else hf.tidar_mask_token_id,
                      block_size or hf.tidar_draft_block_size, hf.eos_token_ids, compile, attention, beta)
        decoder.checkpoint_config = hf
        return decoder

    def generate(self, prompts, max_new_tokens: int | list[int], mode: str = "tidar", sampling=SamplingConfig(),
                 seed: int | None = None, block_size: int | None = None, beta: float | None = None) -> Generation:
        steps = list(self.stream(prompts, max_new_tokens, mode, sampling, seed, block_size, beta))
        batch = len(steps[0].new_tokens)
        return Generation([sum((s.new_tokens[i] for s in steps), []) for i in range(batch)], steps[-1].stats)

    def stream(self, prompts, max_new_tokens: int | list[int], mode: str = "tidar", sampling=SamplingConfig(),
               seed=None, block_size: int | None = None, beta: float | None = None) -> Iterator[StreamStep]:
        """Yields after every forward pass the tokens it made final.

        prompts: one list of token ids, or a list of them (a batch; lengths may differ).  max_new_tokens: one
        for every prompt or one each; past the model's context is refused (`step.fit_context` first clamps
        it and says so, as the commands do).  sampling: greedy by
        default; with a temperature, TiDAR drafts are verified by rejection sampling; a list gives each prompt
        its own.  seed: one int (prompt i draws stream i of it), a list (prompt i draws stream 0 of seed[i],
        so its tokens are those it gets alone with that seed), or None (from entropy).
        """
        prompts = [list(prompts)] if isinstance(prompts[0], int) else [list(p) for p in prompts]
        block_size = block_size or self.block_size
        beta = self.beta if beta is None else check_beta(beta)
        max_new_tokens = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) \
            else [max_new_tokens] * len(prompts)
        self._check(prompts, max_new_tokens, mode, block_size)
        block = block_size if mode == "tidar" else 1
        longest = max(map(len, prompts))
        # The last pass of a sequence writes one whole decoding pass (pending block + mask blocks) past its prefix.
        pass_len = TiDARLayout.for_decoding(0, block).seq_len
        self.model.setup_kv_cache(len(prompts), longest + max(max_new_tokens) + pass_len)
        settings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        if isinstance(seed, (list, tuple)):
            seeds, streams = [s if s is not None else secrets.randbits(64) for s in seed], None
        else:
            seeds = [secrets.randbits(64) if seed is None else seed] * len(prompts)
            streams = list(range(len(prompts)))
        if len(settings) != len(prompts) or len(seeds) != len(prompts):
            raise DecodingError(f"{len(prompts)} prompts need as many sampling settings and seeds, got "
                                f"{len(settings)} and {len(seeds)}")
        rows = RowSampling.of(settings, seeds, self.device, streams)
        stats = DecodeStats(mode, block, acceptance_histogram=[0] * block)
        stop = _StopRule(len(prompts), max_new_tokens, self.eos_token_ids)
        with torch.inference_mode():
            if mode == "tidar":
                yield from self._tidar(prompts, rows, stats, stop, block, beta)
            else:
                yield from self._ar(prompts, rows, stats, stop)

    @property
    def max_positions(self) -> int | None:
        """The checkpoint's max_position_embeddings (None: not known)."""
        return getattr(self.checkpoint_config, "max_position_embeddings", None)

    def _check(self, prompts, max_new_tokens, mode, block_size):
        if mode not in MODES:
            raise DecodingError(f"mode must be one of {MODES}, got {mode!r}")
        if any(len(p) == 0 for p in prompts):
            raise DecodingError("every prompt needs at least one token")
        if len(max_new_tokens) != len(prompts) or min(max_new_tokens) < 1:
            raise DecodingError(f"max_new_tokens must be >= 1 for each of the {len(prompts)} prompts, "
                                f"got {max_new_tokens}")
        for i, (prompt, new) in enumerate(zip(prompts, max_new_tokens)):
            check_context(len(prompt), new, self.max_positions, f"prompt {i + 1}: " if len(prompts) > 1 else "")
        if mode == "tidar":
            if self.mask_token_id is None or block_size is None:
                raise DecodingError("TiDAR decoding needs the mask token id and draft block size: the checkpoint's "
                                 "config.json has no tidar_mask_token_id / tidar_draft_block_size, so pass "
                                 "them (--mask-token-id, --block-size), or use --mode ar")
            if block_size < 2:
                raise DecodingError(f"TiDAR decoding needs block_size >= 2 (got {block_size}); "
                                 f"use mode 'ar' for one token per pass")

    def padded(self, tokens: list[list[int]]) -> torch.Tensor:
        """[b, width] ids on the device; shorter rows repeat their last token (rows past a layout's end)."""
        width = max(map(len, tokens))
        return torch.tensor([t + [t[-1]] * (width - len(t)) for t in tokens], device=self.device)

    def forward_pass(self, ids: torch.Tensor, layouts, first_rows, step: bool = False,
                     cache_rows: list[int] | None = None):
        """One pass over rows [first_row, first_row + width) of each layout; returns logits [b, width, V].
        `cache_rows`: the KV-cache row of each sequence (default: row i for sequence i).  `step`: a decoding
        step (the compiled model, when compiled)."""
        width = ids.shape[1]
        model = self._step_model if step else self.model
        if cache_rows is not None and cache_rows != list(range(len(cache_rows))):
            cache_rows = torch.tensor(cache_rows, device=self.device)
        else:
            cache_rows = None  # rows 0..b-1: the cache is sliced, not gathered
        shared = layouts[0]
        if (self.attention == "kernel" and all(l == shared for l in layouts) and len(set(first_rows)) == 1
                and first_rows[0] + width == shared.seq_len):
            positions = shared.position_ids[first_rows[0]:].expand(len(layouts), -1).to(self.device)
            slots = (first_rows[0] + torch.arange(width, device=self.device)).expand(len(layouts), -1)
            return model(ids, positions, None, slots, shared.seq_len, layout=shared, cache_rows=cache_rows)
        if step and self.attend_whole_cache:
            num_keys = self.model.model.layers[0].self_attn.kv_cache.k.shape[1]
        else:
            num_keys = max(first + width for first in first_rows)
        positions, slots, mask = (t.to(self.device) for t in pass_inputs(layouts, first_rows, width, num_keys))
        return model(ids, positions, mask, slots, num_keys, cache_rows=cache_rows)

    def prefill(self, prompts: list[list[int]], mode: str, block: int, sampling: RowSampling, beta: float,
                cache_rows: list[int] | None = None) -> PassResult:
        """The prompts' forward (TiDAR: each with one mask block after it, `TiDARLayout.for_prefill`) and each
        one's first token (TiDAR: and drafts): one forward, one call of the decoding core (pass number 0),
        nothing read back.  `cache_rows`: as in `forward_pass`."""
        b = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        rows = torch.arange(b, device=self.device)
        counters = torch.zeros(b, dtype=torch.long, device=self.device)
        if mode == "ar":
            logits = self.forward_pass(self.padded(prompts), [TiDARLayout.causal(len(p)) for p in prompts],
                                       [0] * b, cache_rows=cache_rows)
            return ar_step(logits[rows, lengths - 1], sampling, counters)
        layouts = [TiDARLayout.for_prefill(len(p), block) for p in prompts]
        ids = self.padded([p + [self.mask_token_id] * block for p in prompts])
        logits = self.forward_pass(ids, layouts, [0] * b, cache_rows=cache_rows)
        first_block = logits[rows[:, None], torch.stack([l.full_block_rows[0] for l in layouts]).to(self.device)]
        return prefill_select(logits[rows, lengths - 1], first_block, beta, sampling, counters)

    def step(self, pending: torch.Tensor, prefixes: list[int], mode: str, block: int, sampling: RowSampling,
             counters: torch.Tensor, draft_probs: torch.Tensor | None, beta: float,
             cache_rows: list[int] | None = None, compiled: bool = True) -> PassResult:
        """One decoding pass for every sequence: its pending block [b, B] (AR: [b, 1], the token to feed) at
        positions prefixes[i]..; one forward (`compiled`: the compiled model, when there is one), one call of
        the decoding core, nothing read back."""
        if mode == "ar":
            logits = self.forward_pass(pending, [TiDARLayout.causal(m + 1) for m in prefixes], prefixes,
                                       step=compiled, cache_rows=cache_rows)
            return ar_step(logits[:, 0], sampling, counters)
        groups, num_masks = self._step_rows(block)
        masks = torch.full((len(prefixes), num_masks), self.mask_token_id, device=self.device)
        layouts = [TiDARLayout.for_decoding(m, block) for m in prefixes]
        logits = self.forward_pass(torch.cat([pending, masks], dim=1), layouts, prefixes, step=compiled,
                                   cache_rows=cache_rows)
        return tidar_step(logits, pending, draft_probs, groups, beta, sampling, counters)

    def _step_rows(self, block: int) -> tuple[torch.Tensor, int]:
        """A decoding pass's rows relative to its first (the prefix only shifts them): groups [B, B], the rows
        of mask block a - 1 for acceptance length a = 1..B (it starts right after the a kept tokens), and the
        number of mask tokens after the pending block.  Kept per block size: every pass needs them."""
        if block not in self._step_tables:
            layout = TiDARLayout.for_decoding(0, block)
            self._step_tables[block] = layout.full_block_rows.to(self.device), layout.seq_len - layout.clean_len
        return self._step_tables[block]

    def _emit(self, stop, stats, tokens_per_row, started):
        """Applies the stop rule (finished rows get []); returns (final tokens per row, rows still generating)."""
        emitted = [stop.commit(i, t) for i, t in enumerate(tokens_per_row)]
        stats.new_tokens += sum(map(len, emitted))
        stats.forward_passes += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        stats.seconds += time.perf_counter() - started
        return emitted, [not f for f in stop.finished]

    def _tidar(self, prompts, sampling: RowSampling, stats, stop, block: int, beta: float):
        """State on the host (prefixes, pending blocks, read once per pass from the packed result) and on the
        device (pending blocks, draft distributions, the draw counters)."""
        started = time.perf_counter()
        result = self.prefill(prompts, "tidar", block, sampling, beta)
        counters = torch.zeros(len(prompts), dtype=torch.long, device=self.device)
        pending, draft_probs = result.pending, result.draft_probs                 # [b, B], [b, B-1, V]
        host = [new_tokens(None, row) for row in result.packed.tolist()]
        prefix = [len(p) for p in prompts]                                          # prefix m
        stats.sequence_passes += len(prompts)
        emitted, active = self._emit(stop, stats, [new for _, new, _ in host], started)
        yield StreamStep(emitted, list(prefix), stats)
        while any(active):
            started = time.perf_counter()
            counters = counters + 1
            result = self.step(pending, prefix, "tidar", block, sampling, counters, draft_probs, beta)
            host = [new_tokens(old, row) for (_, _, old), row in zip(host, result.packed.tolist())]
            for (a, _, _), generating in zip(host, active):
                stats.acceptance_histogram[a - 1] += generating
            stats.sequence_passes += sum(active)
            emitted, still = self._emit(stop, stats, [new for _, new, _ in host], started)
            # Sequences that just finished keep their last state, so later passes stay inside the cache.
            prefix = [m + a if live else m for m, (a, _, _), live in zip(prefix, host, still)]
            live = torch.tensor(still, device=self.device)
            pending = torch.where(live[:, None], result.pending, pending)
            if draft_probs is not None:
                draft_probs = torch.where(live[:, None, None], result.draft_probs, draft_probs)
            active = still
            yield StreamStep(emitted, list(prefix), stats)

    def _ar(self, prompts, sampling: RowSampling, stats, stop):
        started = time.perf_counter()
        result = self.prefill(prompts, "ar", 1, sampling, self.beta)
        counters = torch.zeros(len(prompts), dtype=torch.long, device=self.device)
        token = result.pending                                                     # [b, 1]
        prefix = [len(p) for p in prompts]  # slot of the next token to feed
        stats.sequence_passes += len(prompts)
        emitted, active = self._emit(stop, stats, [row[1:] for row in result.packed.tolist()], started)
        yield StreamStep(emitted, list(prefix), stats)
        while any(active):
            started = time.perf_counter()
            counters = counters + 1
            result = self.step(token, prefix, "ar", 1, sampling, counters, None, self.beta)
            stats.sequence_passes += sum(active)
            emitted, active = self._emit(stop, stats, [row[1:] for row in result.packed.tolist()], started)
            prefix = [m + 1 if live else m for m, live in zip(prefix, active)]
            token = torch.where(torch.tensor(active, device=self.device)[:, None], result.pending, token)
            yield StreamStep(emitted, list(prefix), stats)
