"""Host time of the kernel's tile tables for one decoding pass, the part of a kernel decoding step that
runs on the CPU before the launch (each pass has a new prefix, hence a new layout and new tables).

    python benchmarks/decode_tile_tables.py [--prefixes 1024 4096 8192] [--block-size 16]

Compares tables built over every row of the layout (`first_row=0`, what the kernel did before decoding
steps passed their first queried row) with tables built from the first queried row (what it does now),
alternating the two on each prefix; prints milliseconds per pass and their ratio.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from tidar_kernels.tile_tables import tile_tables

from tidar_megatron.layout import TiDARLayout


def ms_per_pass(prefix: int, block: int, from_first_row: bool, passes: int, tiles) -> float:
    tile_tables.cache_clear()  # earlier rounds built the same layouts
    start = time.perf_counter()
    for i in range(passes):  # a new prefix each pass, as in decoding: the table cache never hits
        layout = TiDARLayout.for_decoding(prefix + i, block)
        tile_tables(layout, *tiles, torch.device("cpu"), prefix + i if from_first_row else 0)
    return (time.perf_counter() - start) / passes * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prefixes", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--tiles", type=int, nargs=2, default=[128, 64], help="query and key tile sizes")
    p.add_argument("--passes", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"CPU {platform.processor() or platform.machine()}, 1 thread; block {args.block_size}, "
          f"tiles {args.tiles[0]}x{args.tiles[1]}, best of {args.rounds} rounds of {args.passes} passes")
    print(f"{'prefix':>7} {'all rows ms':>12} {'queried rows ms':>16} {'ratio':>7}")
    for prefix in args.prefixes:
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.rounds):
            for from_first_row in (False, True):
                best[from_first_row] = min(best[from_first_row], ms_per_pass(
                    prefix, args.block_size, from_first_row, args.passes, tuple(args.tiles)))
        print(f"{prefix:>7} {best[False]:>12.2f} {best[True]:>16.2f} {best[False] / best[True]:>6.1f}x")


if __name__ == "__main__":
    main()
