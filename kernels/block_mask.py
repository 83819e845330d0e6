"""What the TiDAR kernels take as a mask: per-row key ranges and a tile classification.

The kernels do not know the TiDAR layout; they take any object with

    seq_len                       number of rows (queries) and keys of the full sequence
    row_ranges                    (clean_end, block_lo, block_hi), each [seq_len] int64: row r sees keys
                                  [0, clean_end[r]) and [block_lo[r], block_hi[r])
    tile_classes(tile_q, tile_k, first_row=0)
                                  [ceil(seq_len / tile_q), ceil(seq_len / tile_k)] int8 of the codes below,
                                  exact for those row ranges; query tiles wholly before first_row are SKIP

and must be hashable (tile tables are cached per mask).  `tidar_megatron.layout.TiDARLayout` is one; the
dependency points one way, tidar_megatron -> tidar_kernels.
"""

from __future__ import annotations

from typing import Protocol

import torch

# Tile classes: SKIP tiles are never visited, FULL tiles run unmasked, PARTIAL tiles apply the row ranges.
TILE_SKIP, TILE_PARTIAL, TILE_FULL = 0, 1, 2


class BlockSparseMask(Protocol):
    @property
    def seq_len(self) -> int: ...

    @property
    def row_ranges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def tile_classes(self, tile_q: int, tile_k: int, first_row: int = 0) -> torch.Tensor: ...
