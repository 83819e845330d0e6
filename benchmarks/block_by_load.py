"""Which draft block is fastest at which load: the decoding passes' tokens/s by batch size and block, to choose
`serve --block-by-load auto:ROWS` for a device.

    python benchmarks/block_by_load.py                                    # CPU: the serving benchmark's toy
    python benchmarks/block_by_load.py --model <hf dir> --device cuda --batches 1 4 16 64 256

For each batch n and block b (1 = AR passes), n sequences are prefilled from the prompts and decoded greedily
until they made --new-tokens each on average (rounds of that for --seconds) through `Decoder.stream`, whose
passes (`Decoder.prefill` / `Decoder.step`) the server runs too.
Prints tokens/s and tokens per pass per cell, then per batch the fastest TiDAR block and its query rows
n x (b + b^2): `auto:ROWS` should let the fastest block through at each batch (ROWS at least those rows,
below the next block's).  No HTTP: the server adds a fixed
cost per pass, which favours larger blocks at one or two streams (docs/benchmarks.md has both).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.generate import DTYPES, resolve_dtype
from tidar_megatron.serving.block_policy import pass_rows


def rate(decoder: Decoder, prompts: list[list[int]], n: int, block: int, new_tokens: int, seconds: float):
    """(tokens/s, tokens per sequence per pass) of greedy `Decoder.stream` passes over n sequences at `block`:
    rounds of a prefill (not timed) and passes until the sequences made `new_tokens` each on average (none
    more than 4x that), for `seconds`."""
    batch = [prompts[i % len(prompts)] for i in range(n)]
    tokens, passes, elapsed = 0, 0, 0.0
    while elapsed < seconds:
        steps = decoder.stream(batch, 4 * new_tokens, "ar" if block == 1 else "tidar", block_size=max(block, 2))
        next(steps)  # the prefill
        made, start = 0, time.perf_counter()
        for step in steps:
            made, passes = made + sum(map(len, step.new_tokens)), passes + 1
            if made >= n * new_tokens:
                break
        elapsed += time.perf_counter() - start
        steps.close()
        tokens += made
    return tokens / elapsed, tokens / passes / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="exported HF directory (default: serve_throughput's toy, trained here)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--blocks", type=int, nargs="+", help="default: 1, 2, 3, 4, 6, the checkpoint's")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per sequence per round (as serve_throughput)")
    p.add_argument("--seconds", type=float, default=1.0, help="decoding time per cell")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = None
    if args.model:
        model_dir = Path(args.model)
    else:
        from serve_throughput import toy_checkpoint  # benchmarks/ is the script's directory

        model_dir = Path(tempfile.mkdtemp(prefix="block_by_load_")) / "toy"
        prompts = toy_checkpoint(model_dir, 8, 300)
    decoder = Decoder.from_pretrained(model_dir, resolve_dtype(args.dtype, args.device), args.device)
    if prompts is None:  # a real checkpoint: random ids (a model's drafts on its own text do better)
        generator = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, decoder.model.args.vocab_size - 1, (64, 16), generator=generator).tolist()
    full = decoder.block_size
    blocks = sorted(set(args.blocks or [1, 2, 3, 4, 6, full]))
    decoder.eos_token_ids = ()  # every pass's tokens count, as in a benchmark of passes (no early finish)
    print(f"{model_dir} on {args.device}, {args.threads} CPU thread(s); tokens/s (tokens per pass), block 1 = AR")
    print("batch " + "".join(f"{'block ' + str(b):>18}" for b in blocks) + "   fastest TiDAR block: rows")
    for n in args.batches:
        cells = {b: rate(decoder, prompts, n, b, args.new_tokens, args.seconds) for b in blocks}
        best = max((b for b in blocks if b > 1), key=lambda b: cells[b][0], default=None)
        print(f"{n:>5} " + "".join(f"{cells[b][0]:>10.0f} ({cells[b][1]:.2f})" for b in blocks)
              + (f"   {best}: {n * pass_rows(best)}" if best else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
