"""The TiDAR sequence layout, defined once.

A TiDAR sequence is a *clean* segment followed by *draft blocks* of mask tokens:

    index:  0 .. C-1              C .. C+n_blocks*B-1
            clean tokens          mask blocks, block j covering draft positions [s_j, e_j)

Attention rule (`allowed(query, key)`):
  * a clean token at position q sees the clean tokens at positions <= q (causal, the AR half);
  * a mask token in the block that starts at draft position s sees the clean tokens at positions < s,
    plus every token of its own block (bidirectional).  It never sees another block.
Positions: clean index i carries position i; the r-th mask token of a block starting at s carries s + r.
Targets: a clean token predicts the next clean token (AR); a mask token predicts the clean token at its
own position (diffusion).

Packed documents (`with_documents`, Megatron-LM's reset_attention_mask / reset_position_ids): each sample
of a batch may hold several documents.  With document attention a clean token sees only the earlier tokens
of its own document, and a mask token only the clean tokens of its own document before its block's start
plus the tokens of its own block that belong to its document; with document positions, positions restart
at 0 at every document start.  The per-row arrays then become per sample, [batch, seq_len].

Training ("full mask") uses C = L and blocks starting at 0, B, 2B, ... (the last one shorter when B does
not divide L).  Decoding uses C = prefix + B (the verified prefix plus the pending block) and one block
per possible acceptance length, starting at prefix + 1, ..., prefix + B.  Every derived form below (the
dense masks, FlexAttention's mask_mod, the kernels' tile classes, the decoding mask) is computed from the
four per-row arrays `clean_lo`, `clean_end`, `block_lo`, `block_hi`, so the rule is stated exactly once,
in `_visible`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

# The tile codes the kernels read (tidar_kernels defines them; it does not import this module).
from tidar_kernels.block_mask import TILE_FULL, TILE_PARTIAL, TILE_SKIP  # noqa: F401


def _visible(key, clean_lo, clean_end, block_lo, block_hi):
    """The rule itself, on a query row's entries of the per-row arrays: the clean keys [clean_lo,
    clean_end), then the own block's [block_lo, block_hi)."""
    return ((key >= clean_lo) & (key < clean_end)) | ((key >= block_lo) & (key < block_hi))


@dataclass(frozen=True)
class TiDARLayout:
    clean_len: int
    block_size: int
    block_starts: tuple[int, ...]
    block_ends: tuple[int, ...]
    # Packed documents, one tuple per sample of a batch: the clean indices where a document after the
    # first starts.  Empty: one document per sample, and a layout shared by every sample.
    documents: tuple[tuple[int, ...], ...] = ()
    document_attention: bool = True   # reset_attention_mask
    document_positions: bool = True   # reset_position_ids

    def __post_init__(self):
        if self.clean_len < 1 or self.block_size < 1:
            raise ValueError(f"TiDAR layout needs clean_len >= 1 and block_size >= 1, "
                             f"got clean_len={self.clean_len}, block_size={self.block_size}")
        if len(self.block_starts) != len(self.block_ends):
            raise ValueError(f"TiDAR layout: {len(self.block_starts)} block starts but {len(self.block_ends)} "
                             "block ends; give one (start, end) pair per draft block")
        for s, e in zip(self.block_starts, self.block_ends):
            if not (0 <= s < e and e - s <= self.block_size):
                raise ValueError(f"TiDAR layout: draft block [{s}, {e}) is empty, negative or longer than "
                                 f"block_size={self.block_size}")
        for cuts in self.documents:
            if list(cuts) != sorted(set(cuts)) or (cuts and not 0 < cuts[0] <= cuts[-1] < self.clean_len):
                raise ValueError(f"TiDAR layout: document starts {cuts} must increase within (0, "
                                 f"clean_len={self.clean_len})")

    def with_documents(self, starts, attention: bool = True, positions: bool = True) -> "TiDARLayout":
        """This layout for a batch of packed samples: `starts[i]` lists the clean indices where a document
        after the first starts in sample i (after each end-of-document token).  For training layouts (every
        block inside the clean sequence)."""
        if max(self.block_ends, default=0) > self.clean_len:
            raise ValueError("packed documents apply to training layouts, whose blocks draft clean tokens")
        return TiDARLayout(self.clean_len, self.block_size, self.block_starts, self.block_ends,
                           tuple(tuple(int(c) for c in cuts) for cuts in starts), attention, positions)

    @property
    def batch_size(self) -> int | None:
        """The number of samples a per-sample layout describes (None: shared by any batch)."""
        return len(self.documents) or None
    @classmethod
    def for_training(cls, clean_len: int, block_size: int) -> "TiDARLayout":
        """The paper's full-mask layout: L clean tokens, then L mask tokens in ceil(L/B) blocks."""
        starts = tuple(range(0, clean_len, block_size))
        ends = tuple(min(s + block_size, clean_len) for s in starts)
        return cls(clean_len, block_size, starts, ends)

    @classmethod
    def causal(cls, num_tokens: int) -> "TiDARLayout":
        """No draft blocks: plain causal attention (AR decoding, AR baselines)."""
        return cls(num_tokens, 1, (), ())

    @classmethod
    def for_prefill(cls, prompt_len: int, block_size: int) -> "TiDARLayout":
        """Decoding's first pass: the prompt, then one block drafting the positions right after it."""
        return cls(prompt_len, block_size, (prompt_len,), (prompt_len + block_size,))

    @classmethod
    def for_decoding(cls, prefix_len: int, block_size: int) -> "TiDARLayout":
        """One decoding pass: the pending block (its first token verified, the rest drafts) at positions
        [prefix, prefix+B) follows the cached prefix; the block for acceptance length a = 1..B starts at
        prefix + a, i.e. right after the accepted part of the pending block."""
        clean_len = prefix_len + block_size
        starts = tuple(prefix_len + a for a in range(1, block_size + 1))
        return cls(clean_len, block_size, starts, tuple(s + block_size for s in starts))

    # --- sizes -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.block_starts)

    @cached_property
    def seq_len(self) -> int:
        return self.clean_len + sum(e - s for s, e in zip(self.block_starts, self.block_ends))

    def block_rows(self, j: int) -> range:
        """The sequence indices of draft block j (its mask tokens)."""
        first = self.clean_len + sum(e - s for s, e in zip(self.block_starts[:j], self.block_ends[:j]))
        return range(first, first + self.block_ends[j] - self.block_starts[j])

    @cached_property
    def full_block_rows(self) -> torch.Tensor:
        """[n, block_size] int64: the rows of every block that has block_size tokens, in order."""
        rows = [list(self.block_rows(j)) for j in range(self.num_blocks)
                if self.block_ends[j] - self.block_starts[j] == self.block_size]
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.block_size)

    @cached_property
    def draft_offsets(self) -> torch.Tensor:
        """[seq_len] int64: a mask token's offset r inside its block (it drafts block start + r); -1 for
        clean rows."""
        offsets = torch.full((self.seq_len,), -1, dtype=torch.long)
        for j in range(self.num_blocks):
            rows = self.block_rows(j)
            offsets[rows.start:rows.stop] = torch.arange(len(rows))
        return offsets

    # --- a layout as a tensor, to travel through Megatron ----------------------------------------
    def to_tensor(self) -> torch.Tensor:
        """1-D int64 (CPU): the layout in a form Megatron passes to core attention as its `attention_mask`.
        Megatron's activation recompute checkpoints only tensor arguments (it encodes its own mask type as
        a tensor for the same reason), so a layout object would not survive it."""
        documents = [len(self.documents), int(self.document_attention), int(self.document_positions)]
        for cuts in self.documents:
            documents += [len(cuts), *cuts]
        return torch.tensor([self.clean_len, self.block_size, self.num_blocks, *self.block_starts,
                             *self.block_ends, *documents], dtype=torch.long)

    @staticmethod
    def from_tensor(encoded: torch.Tensor) -> "TiDARLayout":
        """The layout `to_tensor` encoded; equal layouts come back as one object, so every cache keyed
        by the layout (block masks, tile tables) is hit."""
        return _decoded(tuple(encoded.tolist()))

    # --- per-row arrays: the single description every derived form uses ----------------------
    @cached_property
    def _shared_rows(self) -> dict[str, torch.Tensor]:
        """Each [seq_len]: the clean index a row stands for, and its key ranges without documents."""
        n, c = self.seq_len, self.clean_len
        index = torch.empty(n, dtype=torch.long)
        clean_end = torch.empty(n, dtype=torch.long)  # clean keys with index < clean_end are visible
        block_lo = torch.zeros(n, dtype=torch.long)   # own block's index range [block_lo, block_hi)
        block_hi = torch.zeros(n, dtype=torch.long)
        index[:c] = torch.arange(c)
        clean_end[:c] = torch.arange(1, c + 1)
        i = c
        for s, e in zip(self.block_starts, self.block_ends):
            w = e - s
            index[i:i + w] = torch.arange(s, e)
            clean_end[i:i + w] = min(s, c)
            block_lo[i:i + w], block_hi[i:i + w] = i, i + w
            i += w
        return {"index": index, "clean_lo": torch.zeros(n, dtype=torch.long), "clean_end": clean_end,
                "block_lo": block_lo, "block_hi": block_hi}

    @cached_property
    def _rows(self) -> dict[str, torch.Tensor]:
        """position and the key ranges: [seq_len], or [batch, seq_len] for packed documents."""
        shared = self._shared_rows
        if not self.documents:
            return dict(shared, position=shared["index"])
        index = shared["index"]
        starts = torch.zeros(len(self.documents), self.clean_len + 1, dtype=torch.long)  # doc start per index
        for b, cuts in enumerate(self.documents):
            for cut in cuts:
                starts[b, cut:] = cut
        ends = torch.full_like(starts, self.clean_len)  # the end of the document holding each index
        for b, cuts in enumerate(self.documents):
            bounds = [0, *cuts, self.clean_len]
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                ends[b, lo:hi] = hi
        doc_start = starts[:, index.clamp(max=self.clean_len - 1)]   # [b, S]: of the token a row stands for
        doc_end = ends[:, index.clamp(max=self.clean_len - 1)]
        rows = {"position": index - doc_start if self.document_positions else index.expand_as(doc_start)}
        if not self.document_attention:
            return dict(rows, **{k: shared[k].expand_as(doc_start) for k in
                                 ("clean_lo", "clean_end", "block_lo", "block_hi")})
        clean = torch.arange(self.seq_len) < self.clean_len
        clean_lo = doc_start
        clean_end = torch.maximum(shared["clean_end"].expand_as(doc_start), clean_lo)
        # A mask row's own block, cut to the part of it that drafts its document: block rows are in index
        # order, so that part is a contiguous sub-range.
        block_start_index = index - (torch.arange(self.seq_len) - shared["block_lo"])  # the block's start s
        block_lo = shared["block_lo"] + (doc_start - block_start_index).clamp(min=0)
        block_hi = shared["block_lo"] + (doc_end - block_start_index).clamp(max=(shared["block_hi"] - shared["block_lo"]))
        block_lo, block_hi = torch.where(clean, 0, block_lo), torch.where(clean, 0, block_hi)
        return dict(rows, clean_lo=clean_lo, clean_end=clean_end, block_lo=block_lo, block_hi=block_hi)

    @property
    def position_ids(self) -> torch.Tensor:
        """[seq_len] (or [batch, seq_len]) RoPE positions: a mask token carries the position of the token it
        drafts; with document positions, counted from its document's start."""
        return self._rows["position"]

    @property
    def source_index(self) -> torch.Tensor:
        """[seq_len] the clean index each row stands for: itself for a clean row, the index it drafts for
        a mask row (the diffusion target's index; equal to the position without document positions)."""
        return self._shared_rows["index"]

    @property
    def is_mask(self) -> torch.Tensor:
        """[seq_len] bool, True for mask (draft) tokens."""
        return torch.arange(self.seq_len) >= self.clean_len

    @property
    def row_ranges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean_lo, clean_end, block_lo, block_hi), each [seq_len] (or [batch, seq_len]) int64: the visible
        keys of row q are [clean_lo[q], clean_end[q]) and [block_lo[q], block_hi[q]).  Kernels take these."""
        r = self._rows
        return r["clean_lo"], r["clean_end"], r["block_lo"], r["block_hi"]

    # --- the rule ----------------------------------------------------------------------------
    def allowed(self, query, key):
        """May `query` attend to `key`?  Works on ints and (broadcastable) index tensors; for packed
        documents the result has a leading batch axis."""
        ranges = self.row_ranges
        if isinstance(query, torch.Tensor) and query.device != ranges[0].device:
            ranges = tuple(t.to(query.device) for t in ranges)
        return _visible(key, *(r[:, query] if self.documents else r[query] for r in ranges))

    # --- derived forms ---------------------------------------------------------------------------
    def dense_mask(self, device=None) -> torch.Tensor:
        """[seq_len, seq_len] (or [batch, seq_len, seq_len]) bool, True = may attend (SDPA polarity)."""
        idx = torch.arange(self.seq_len, device=device)
        return self.allowed(idx[:, None], idx[None, :])

    def megatron_mask(self, device=None) -> torch.Tensor:
        """[1 or batch, 1, seq_len, seq_len] bool, True = masked out (Megatron / TransformerEngine polarity)."""
        keep = self.dense_mask(device)
        return ~(keep[:, None] if self.documents else keep[None, None])

    def mask_mod(self, device=None):
        """A FlexAttention mask_mod(b, h, q_idx, kv_idx) implementing `allowed`."""
        clean_lo, clean_end, block_lo, block_hi = (t.to(device) for t in self.row_ranges)
        if self.documents:
            def tidar_mask_mod(b, h, q_idx, kv_idx):
                return _visible(kv_idx, clean_lo[b, q_idx], clean_end[b, q_idx], block_lo[b, q_idx],
                                block_hi[b, q_idx])
        else:
            def tidar_mask_mod(b, h, q_idx, kv_idx):
                return _visible(kv_idx, clean_lo[q_idx], clean_end[q_idx], block_lo[q_idx], block_hi[q_idx])

        return tidar_mask_mod

    def tile_classes(self, tile_q: int, tile_k: int, first_row: int = 0) -> torch.Tensor:
        """[ceil(S/tile_q), ceil(K/tile_k)] int8 of TILE_SKIP / TILE_PARTIAL / TILE_FULL.

        Exact, because each row's visible keys are two intervals: a tile is FULL when every row sees all
        its keys, SKIP when no row sees any.  Rows and keys past the end (ragged last tiles) are ignored.
        For packed documents the classes hold for every sample at once (FULL or SKIP only where they are
        in all samples), so one table serves the batch.
        `first_row`: only rows from there on are queried (a decoding step; the cached prefix is not), so
        query tiles wholly before it are SKIP; the work then scales with the queried rows, not the prefix.
        """
        k = self.seq_len
        if not 0 <= first_row < k:
            raise ValueError(f"first_row={first_row} must lie in [0, seq_len={k})")
        skipped_tiles = first_row // tile_q
        start = skipped_tiles * tile_q
        n = k - start
        ranges = [r[..., start:].reshape(-1, n) for r in self.row_ranges]  # [samples, rows]
        k0 = torch.arange(0, k, tile_k)
        k1 = (k0 + tile_k).clamp(max=k)

        def overlap(lo, hi):  # [samples, rows, key tiles] keys of each key tile inside [lo, hi)
            return (torch.minimum(hi[..., None], k1) - torch.maximum(lo[..., None], k0)).clamp(min=0)

        clean_lo, clean_end, block_lo, block_hi = ranges
        seen = overlap(clean_lo, clean_end) + overlap(block_lo, block_hi)  # the two ranges are disjoint
        width = k1 - k0
        num_q_tiles = -(-n // tile_q)
        pad = num_q_tiles * tile_q - n
        full_rows = torch.nn.functional.pad(seen == width, (0, 0, 0, pad), value=True)
        empty_rows = torch.nn.functional.pad(seen == 0, (0, 0, 0, pad), value=True)
        full = full_rows.view(len(seen), num_q_tiles, tile_q, -1).all(2).all(0)
        empty = empty_rows.view(len(seen), num_q_tiles, tile_q, -1).all(2).all(0)
        out = torch.full(full.shape, TILE_PARTIAL, dtype=torch.int8)
        out[full] = TILE_FULL
        out[empty] = TILE_SKIP
        return torch.nn.functional.pad(out, (0, 0, skipped_tiles, 0), value=TILE_SKIP)

    # --- training targets ------------------------------------------------------------------------
    def training_inputs(self, tokens: torch.Tensor, mask_token_id: int) -> torch.Tensor:
        """[b, L] clean tokens -> [b, seq_len] input ids: the clean tokens, then the mask blocks."""
        self._check_training(tokens)
        masks = torch.full((tokens.shape[0], self.seq_len - self.clean_len), mask_token_id,
                           dtype=tokens.dtype, device=tokens.device)
        return torch.cat([tokens, masks], dim=1)

    def training_targets(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor):
        """Targets and loss masks for the doubled sequence.

        tokens [b, L] clean inputs; labels [b, L] the next token of each (Megatron's GPTDataset labels);
        loss_mask [b, L] for the AR labels.  Returns (targets [b, 2L], ar_mask [b, 2L], diff_mask [b, 2L]):
        the AR half predicts labels, a mask token at position p predicts tokens[p].  The diffusion target
        tokens[p] is labels[p-1], so it counts exactly when that AR label counts (position 0 always does).
        """
        self._check_training(tokens)
        pos = self.source_index[self.clean_len:].to(tokens.device)
        targets = torch.cat([labels, tokens[:, pos]], dim=1)
        first = torch.ones_like(loss_mask[:, :1])
        diff_weight = torch.cat([first, loss_mask[:, :-1]], dim=1)[:, pos]
        zeros = torch.zeros_like(loss_mask)
        ar_mask = torch.cat([loss_mask, torch.zeros_like(diff_weight)], dim=1)
        diff_mask = torch.cat([zeros, diff_weight], dim=1)
        return targets, ar_mask, diff_mask

    def _check_training(self, tokens: torch.Tensor):
        if tokens.shape[-1] != self.clean_len:
            raise ValueError(f"expected {self.clean_len} clean tokens per sample, got {tokens.shape[-1]}")


@lru_cache(maxsize=64)
def _decoded(values: tuple[int, ...]) -> TiDARLayout:
    clean_len, block_size, n = values[:3]
    starts, ends = tuple(values[3:3 + n]), tuple(values[3 + n:3 + 2 * n])
    rest = values[3 + 2 * n:]
    if len(rest) < 3:
        raise ValueError(f"not an encoded TiDARLayout: {len(values)} values for {n} blocks")
    samples, attention, positions = rest[:3]
    documents, i = [], 3
    for _ in range(samples):
        count = rest[i]
        documents.append(tuple(rest[i + 1:i + 1 + count]))
        i += 1 + count
    return TiDARLayout(clean_len, block_size, starts, ends, tuple(documents), bool(attention), bool(positions))
