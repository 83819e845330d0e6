"""Host-side tables that tell the attention kernels which tiles to visit.

Everything here is derived from the mask's `tile_classes` and `row_ranges` (block_mask.py); the attention
rule itself is never restated.  A kernel program owns one tile of one side (a query tile for the forward and dQ
passes, a key tile for the dK/dV pass) and walks a compact list of the tiles of the other side that are not
SKIP, so skipped tiles cost nothing, not even a branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .block_mask import TILE_FULL, TILE_PARTIAL, TILE_SKIP, BlockSparseMask


@dataclass(frozen=True)
class VisitList:
    """For each tile on the owning side: the tiles of the other side to visit, in ascending order.

    index [owner_tiles, other_tiles] int32, left-packed (entries past count[t] are padding);
    tile_class [owner_tiles, other_tiles] int8, TILE_PARTIAL or TILE_FULL for the packed entries;
    count [owner_tiles] int32.
    """
    index: torch.Tensor
    tile_class: torch.Tensor
    count: torch.Tensor


@dataclass(frozen=True)
class TileTables:
    rows: torch.Tensor  # [4, samples, seq_len] int32: the mask's row_ranges (clean_lo, clean_end, block_lo, block_hi)
    keys_of_query_tile: VisitList  # forward and dQ
    queries_of_key_tile: VisitList  # dK / dV


def _visit_list(classes: torch.Tensor, device) -> VisitList:
    visible = classes != TILE_SKIP
    # A stable sort on "is skipped" moves the visible tiles to the front and keeps them ascending.
    order = torch.sort((~visible).to(torch.int8), dim=1, stable=True).indices
    return VisitList(
        index=order.to(torch.int32).contiguous().to(device),
        tile_class=torch.gather(classes, 1, order).contiguous().to(device),
        count=visible.sum(1).to(torch.int32).to(device),
    )


@lru_cache(maxsize=64)
def tile_tables(mask: BlockSparseMask, tile_q: int, tile_k: int, device: torch.device,
                first_row: int = 0) -> TileTables:
    """Tables for tiles of `tile_q` mask rows by `tile_k` keys, cached per (mask, tile sizes, device,
    first_row).  Query tiles wholly before `first_row` (a decoding step's cached prefix) are never listed."""
    classes = mask.tile_classes(tile_q, tile_k, first_row).clone()
    if mask.seq_len % tile_k:
        # tile_classes ignores keys past the end, so a ragged last key tile can be FULL; the kernels only
        # bounds-check keys on PARTIAL tiles, so demote it.
        last = classes[:, -1]
        last[last == TILE_FULL] = TILE_PARTIAL
    rows = torch.stack([r.reshape(-1, mask.seq_len) for r in mask.row_ranges]).to(torch.int32).to(device)
    return TileTables(rows.contiguous(),
                      keys_of_query_tile=_visit_list(classes, device),
                      queries_of_key_tile=_visit_list(classes.t().contiguous(), device))
