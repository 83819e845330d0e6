"""Tile-size tuning for the TiDAR attention kernels.

`triton.autotune` cannot be used as is: the tile-visit tables (tile_tables.py) are kernel *arguments* that
depend on the tile sizes being tuned.  So `tuned` times each candidate with its own tables on first use of a
shape (triton.testing.do_bench, as triton.autotune does) and caches the winner per (kernel, shape).  Under
the Triton interpreter timing means nothing: the first candidate, shrunk to 16 x 16 tiles, is used.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from .tidar_attention_triton import interpreter_active


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int = 4
    num_stages: int = 2
    # dK/dV only: one program per query head of a GQA group (fp32 partial sums added on the host) instead
    # of one per kv head; worth it when the key tiles alone leave SMs idle (short sequences, few kv heads).
    split_kv_groups: bool = False


_chosen: dict[tuple, TileConfig] = {}


def forward_candidates(head_dim: int) -> list[TileConfig]:
    if head_dim > 128:  # shared memory: a 256-wide tile pair does not fit at 128 x 64
        return [TileConfig(64, 32, 4, 2), TileConfig(64, 64, 8, 2), TileConfig(32, 64, 4, 2)]
    return [TileConfig(128, 64, 4, 3), TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 2),
            TileConfig(64, 64, 4, 3), TileConfig(128, 32, 4, 4), TileConfig(64, 128, 4, 2)]


def backward_dkdv_candidates(head_dim: int) -> list[TileConfig]:
    # The program holds a key tile and streams query tiles: wide key tiles, narrow query tiles.
    if head_dim > 128:
        tiles = [TileConfig(16, 64, 4, 2), TileConfig(32, 64, 8, 2), TileConfig(32, 32, 4, 2)]
    else:
        tiles = [TileConfig(32, 128, 8, 2), TileConfig(64, 128, 8, 2), TileConfig(32, 64, 4, 3),
                 TileConfig(64, 64, 4, 2), TileConfig(16, 128, 4, 2)]
    return tiles + [replace(config, split_kv_groups=True) for config in tiles]


def backward_dq_candidates(head_dim: int) -> list[TileConfig]:
    # The program holds a query tile and streams key tiles: the mirror image of dK/dV.
    if head_dim > 128:
        return [TileConfig(64, 16, 4, 2), TileConfig(64, 32, 8, 2), TileConfig(32, 32, 4, 2)]
    return [TileConfig(128, 32, 8, 2), TileConfig(128, 64, 8, 2), TileConfig(64, 32, 4, 3),
            TileConfig(64, 64, 4, 2), TileConfig(128, 16, 4, 2)]


def chosen_config(kernel: str, key: tuple) -> TileConfig | None:
    """The tiles `tuned` picked for `kernel` at `key` (None before first use); the benchmark reports them."""
    return _chosen.get((kernel, key))


def tuned(kernel: str, key: tuple, candidates: list[TileConfig], launch: Callable[[TileConfig], None]):
    """Run `launch` with the fastest of `candidates` for (kernel, key), timing them on first use.

    Every candidate must write the same outputs (each program stores its whole tile), so timing runs on the
    real buffers and the last run leaves correct results behind."""
    config = _chosen.get((kernel, key))
    if config is None:
        if interpreter_active():  # small tiles keep the tests' ragged and partial tiles interesting
            config = replace(candidates[0], block_m=16, block_n=16)
        else:
            config = _fastest(candidates, launch)
        _chosen[(kernel, key)] = config
    launch(config)


def _fastest(candidates, launch) -> TileConfig:
    import triton.testing

    timings = {}
    for config in candidates:
        try:
            timings[config] = triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20)
        except Exception as error:  # a config can exceed shared memory or registers on this GPU
            if "OutOfResources" not in type(error).__name__ and "out of resource" not in str(error):
                raise
    if not timings:
        raise RuntimeError(f"no tile configuration of {candidates} fits this GPU")
    return min(timings, key=timings.get)
