"""How large a draft block each decoding pass of the server uses (`serve --block-by-load`).

A TiDAR pass computes B + B^2 query rows per sequence (the pending block, and one mask block per acceptance
length) for at most B tokens.  While a forward is bound by reading the weights, extra rows are nearly free
and the checkpoint's block gives the most tokens per second; once the batch's rows make it compute-bound,
every row costs time and a smaller block gives more (docs/benchmarks.md has the CPU grid).  The block may
change from pass to pass without changing what is decoded (`runner.fit_pending`).

- `auto[:ROWS]` (the default): a lone sequence uses the checkpoint's block (the paper's batch-1 setting), a
  pass over n > 1 sequences the largest block b <= B with n * (b + b^2) <= ROWS, and at least 2.  ROWS is
  about where a pass turns compute-bound: 256 on a GPU (the roofline's FLOP per byte of bf16 weights is ~206
  on an H200 and ~156 on an A100; to be measured on a lent one), 128 on a CPU (measured through the server
  on the 2-core VM of docs/benchmarks.md: at 16 and 64 streams 128 was faster than 16).  Seeded sampled
  sequences keep the checkpoint's block (below) and their rows count first.
- `off`: the checkpoint's block at any load.
- `N:B[,N:B...]`: passes over at least N sequences use block B (as vLLM's --speculative-disable-by-batch-size,
  graded).

Whatever the policy, a seeded sampled request decodes with the checkpoint's block (the runner sees to it):
speculative sampling keeps its distribution at any block, but which tokens it draws depends on the block, and
a seed promises the tokens the request gets alone.  Greedy output is the same at any block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tidar_megatron.errors import TiDARError
from tidar_megatron.layout import TiDARLayout

AUTO_ROWS = {"cuda": 256, "cpu": 128}  # by device type; others use the GPU's


def pass_rows(block: int) -> int:
    """Query rows of one decoding pass of one sequence: the pending block and a mask block per acceptance
    length (B + B^2)."""
    return TiDARLayout.for_decoding(0, block).seq_len


@dataclass(frozen=True)
class BlockPolicy:
    kind: str = "auto"                                   # auto, off, table
    rows: int | None = None                              # auto: the budget (None: the device's)
    table: dict[int, int] = field(default_factory=dict)  # table: {active sequences: block}

    @classmethod
    def parse(cls, text: str) -> "BlockPolicy":
        """'auto', 'auto:512', 'off', '16:4,48:2' (an argparse type: ValueError on anything else)."""
        kind, colon, rows = text.partition(":")
        if text == "off":
            return cls("off")
        if kind == "auto":
            if colon and not (rows.isdigit() and int(rows) >= 1):
                raise ValueError(f"--block-by-load {text!r}: auto:ROWS takes a positive number of query rows")
            return cls("auto", int(rows) if rows else None)
        usage = f"--block-by-load {text!r}: give auto, auto:ROWS, off, or ACTIVE:BLOCK pairs (e.g. 16:4,48:2)"
        try:
            pairs = [(int(n), int(b)) for n, b in (part.split(":") for part in text.split(","))]
        except ValueError:
            raise ValueError(usage) from None
        table = dict(pairs)
        if len(table) < len(pairs):
            raise ValueError(f"--block-by-load {text!r}: each ACTIVE once")
        return cls("table", table=table)

    def for_checkpoint(self, block: int, device_type: str) -> "BlockPolicy":
        """The policy with its budget resolved for the device, checked against the checkpoint's block."""
        for active, smaller in self.table.items():
            if active < 1 or not 2 <= smaller <= block:
                raise TiDARError(f"--block-by-load {active}:{smaller}: give ACTIVE:BLOCK with ACTIVE >= 1 and BLOCK "
                                 f"in [2, {block}] (the checkpoint's draft block)")
        if self.kind == "auto" and self.rows is None:
            return BlockPolicy("auto", AUTO_ROWS.get(device_type, AUTO_ROWS["cuda"]))
        return self

    def block(self, active: int, full: int, pinned: int = 0) -> int:
        """The draft block of a pass over `active` sequences, for a checkpoint whose block is `full`; `pinned`
        of them decode with `full` whatever the policy (seeded sampled ones), and auto counts their rows."""
        if self.kind == "table":
            return next((b for n, b in sorted(self.table.items(), reverse=True) if active >= n), full)
        if self.kind == "auto" and active > 1:
            rows = self.rows - pinned * pass_rows(full)
            return max([2] + [b for b in range(2, full + 1) if (active - pinned) * pass_rows(b) <= rows])
        return full

    def __str__(self) -> str:
        if self.kind == "table":
            return ",".join(f"{n}:{b}" for n, b in sorted(self.table.items()))
        return self.kind + (f":{self.rows}" if self.rows is not None else "")
