"""What the TiDAR kernels take as a mask: per-row key ranges and a tile classification.

The kernels do not know the TiDAR layout; they take any object with

    seq_len                       number of rows (queries) and keys of the full sequence
    row_ranges                    (clean_lo, clean_end, block_lo, block_hi), each [seq_len] int64, or
                                  [batch, seq_len] when the samples of a batch differ (packed documents):
                                  row r sees keys [clean_lo[r], clean_end[r]) and [block_lo[r], block_hi[r])
    tile_classes(tile_q, tile_k, first_row=0)
                                  [ceil(seq_len / tile_q), ceil(seq_len / tile_k)] int8 of the codes below,
                                  exact for those row ranges (FULL / SKIP only where so for every sample);
                                  query tiles wholly before first_row are SKIP

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
    def row_ranges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def tile_classes(self, tile_q: int, tile_k: int, first_row: int = 0) -> torch.Tensor: ...
