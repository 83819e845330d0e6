"""The cost of one decoding pass at batch 1: an AR pass (1 query token) against a TiDAR pass (block B:
B + B^2 query tokens) after the same cached prefix, on a randomly initialised model of a preset's shape.

    python benchmarks/decode_step.py                          # 1p5b shape, prefix 4096, block 16 (GPU)
    python benchmarks/decode_step.py --shape 8b --prefix 8192
    python benchmarks/decode_step.py --dry-run                # tiny shape on the CPU (kernel in the interpreter)

Timed per attention path of the decoder: `sdpa` (dense mask over the keys a pass can see), `kernel` (the
TiDAR Triton kernel) and `compile` (torch.compile with CUDA graphs, attending over the whole cache, as
`Decoder(compile=True)` runs its steps).  The pass-cost ratio TiDAR / AR (target <= 1.4x at the 1p5b shape)
divides the tokens a TiDAR pass makes: at the paper's 7.45 tokens per pass, TiDAR's tokens/s over AR's is
7.45 / ratio.  The weights are random: a pass costs the same whatever they hold.  `--json FILE` writes the
figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

SHAPES = {  # the decoder's view of configs/1p5b.yaml and configs/8b.yaml (Qwen2.5-1.5B, Qwen3-8B)
    "1p5b": dict(vocab_size=151937, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                 num_kv_heads=2, head_dim=128, attention_bias=True, tie_word_embeddings=True),
    "8b": dict(vocab_size=151937, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
               num_kv_heads=8, head_dim=128, qk_norm=True),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16),
}
PAPER_TOKENS_PER_PASS = 7.45  # TiDAR 1.5B, Table 2


def timed(fn, warmup: int, iters: int, cuda: bool) -> float:
    """Median milliseconds of `fn()`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1p5b", choices=list(SHAPES))
    p.add_argument("--prefix", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--paths", nargs="+", default=["sdpa", "kernel", "compile"], choices=["sdpa", "kernel", "compile"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dry-run", action="store_true", help="tiny shape, prefix 32, block 4, on the CPU")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.dry_run:
        args.shape, args.prefix, args.block_size, args.iters = "tiny", 32, 4, 2

    from tidar_megatron.inference.decoding import pass_inputs
    from tidar_megatron.inference.model import ModelArgs, Transformer
    from tidar_megatron.layout import TiDARLayout

    cuda = torch.cuda.is_available() and not args.dry_run
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model_args = ModelArgs(rms_norm_eps=1e-6, rope_theta=1e6, **SHAPES[args.shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(model_args).to(dtype).eval()
    B, m = args.block_size, args.prefix
    passes = {"AR": TiDARLayout.causal(m + 1), "TiDAR": TiDARLayout.for_decoding(m, B)}
    slots_needed = max(layout.seq_len for layout in passes.values())
    model.setup_kv_cache(1, slots_needed)
    with torch.inference_mode():  # a filled cache: the prefix's keys and values
        prefix = torch.randint(0, model_args.vocab_size, (1, m), device=device)
        causal = TiDARLayout.causal(m)
        model(prefix, causal.position_ids[None].to(device), causal.dense_mask(device)[None],
              torch.arange(m, device=device)[None], m)

    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    results = {"device": device_name, "shape": args.shape, "prefix": m, "block_size": B,
               "dtype": str(dtype).removeprefix("torch."), "paths": {}}
    print(f"device: {device_name}; shape {args.shape}, prefix {m}, block {B}, batch 1, {results['dtype']}")
    for path in args.paths:
        if path == "compile" and not cuda:
            results["paths"][path] = {"skipped": "torch.compile with CUDA graphs needs a GPU"}
            print(f"{path:<8} skipped (no GPU)")
            continue
        row = {}
        for name, layout in passes.items():
            width = layout.seq_len - m
            tokens = torch.randint(0, model_args.vocab_size, (1, width), device=device)
            if path == "kernel":
                positions = layout.position_ids[m:][None].to(device)
                slots = (m + torch.arange(width, device=device))[None]
                step = lambda: model(tokens, positions, None, slots, layout.seq_len, layout=layout)  # noqa: E731
            else:
                keys = slots_needed if path == "compile" else layout.seq_len  # compiled: fixed shapes
                positions, slots, mask = (t.to(device) for t in pass_inputs([layout], [m], width, keys))
                forward = torch.compile(model, mode="reduce-overhead", fullgraph=True) if path == "compile" else model
                step = lambda: forward(tokens, positions, mask, slots, keys)  # noqa: E731
            with torch.inference_mode():
                row[f"{name}_ms"] = timed(step, warmup=3 if path != "compile" else 5, iters=args.iters, cuda=cuda)
        row["ratio"] = row["TiDAR_ms"] / row["AR_ms"]
        row["implied_speedup_at_paper_tokens_per_pass"] = PAPER_TOKENS_PER_PASS / row["ratio"]
        results["paths"][path] = row
        print(f"{path:<8} AR {row['AR_ms']:.3f} ms, TiDAR {row['TiDAR_ms']:.3f} ms ({B} + {B * B} queries): "
              f"{row['ratio']:.2f}x a pass; at {PAPER_TOKENS_PER_PASS} tokens per pass: "
              f"{row['implied_speedup_at_paper_tokens_per_pass']:.2f}x AR tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
