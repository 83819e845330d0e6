"""TiDAR attention: our Triton kernel vs FlexAttention, SDPA with a dense mask, and TransformerEngine.

    python benchmarks/attention.py                       # all shapes, L = 2048 4096 8192, block 16, bf16
    python benchmarks/attention.py --clean-lens 4096 --shapes 8b --backends kernel flex
    python benchmarks/attention.py --decoding --batch 8   # a decoding step (forward), prefix = --clean-lens
    python benchmarks/attention.py --smoke               # no GPU: a tiny correctness run in the interpreter

Prints the device, then per (shape, L, backend) forward and forward+backward milliseconds, TFLOP/s, the speed
ratio against FlexAttention (> 1 = faster than Flex) and the fraction of tiles skipped.  TFLOP/s count the
useful work only (visible query-key pairs x 4 x head_dim per head, backward = 2.5 x forward, as
FlashAttention's benchmarks do), so the same numerator is used for every backend.  Record the numbers in
docs/benchmarks.md with the device, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from tidar_megatron.layout import TiDARLayout

HEAD_SHAPES = {"1p5b": (12, 2, 128), "8b": (32, 8, 128)}  # (query heads, kv heads, head dim), from configs/
SMOKE_SHAPE = (4, 2, 16)  # the --smoke run: tiny, for the CPU interpreter


def visible_pairs(layout: TiDARLayout, q_offset: int) -> int:
    clean_lo, clean_end, block_lo, block_hi = (r[..., q_offset:] for r in layout.row_ranges)
    return int((clean_end - clean_lo + block_hi - block_lo).sum())


def make_backends(layout, q_offset, q_heads, kv_heads, head_dim, names, device):
    """{name: (attention(q, k, v) on [b, s, h, d] tensors, note)} for the requested and available backends.
    q holds the layout rows [q_offset, seq_len) (q_offset > 0: a decoding step), k and v all rows."""
    from tidar_kernels.tidar_attention import tidar_attention

    backends = {}
    if "kernel" in names:
        backends["kernel"] = (lambda q, k, v: tidar_attention(q, k, v, layout, q_offset=q_offset), "")
    if "flex" in names:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        layout_mask_mod = layout.mask_mod(device)

        def mask_mod(b, h, q_idx, kv_idx):  # Flex numbers the queries from 0
            return layout_mask_mod(b, h, q_idx + q_offset, kv_idx)

        block_mask = create_block_mask(mask_mod, None, None, layout.seq_len - q_offset, layout.seq_len,
                                       device=device)
        compiled = torch.compile(flex_attention, dynamic=False)

        def flex(q, k, v):  # Flex wants [b, h, s, d]; the transposes are views, like Megatron's
            out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                           enable_gqa=q_heads != kv_heads)
            return out.transpose(1, 2)

        backends["flex"] = (flex, f"block sparsity {block_mask.sparsity():.1f}%")
    if "sdpa" in names:
        dense_mask = layout.dense_mask(device)[q_offset:]

        def sdpa(q, k, v):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=dense_mask, enable_gqa=q_heads != kv_heads)
            return out.transpose(1, 2)

        backends["sdpa"] = (sdpa, "dense bool mask")
    if "te" in names:
        try:
            import transformer_engine.pytorch as te
        except ImportError:
            print("TransformerEngine is not installed: skipping te")
        else:
            te_attention = te.DotProductAttention(q_heads, head_dim, num_gqa_groups=kv_heads,
                                                  attn_mask_type="arbitrary", qkv_format="bshd")
            megatron_mask = layout.megatron_mask(device)[..., q_offset:, :]  # True = masked out
            backends["te"] = (lambda q, k, v: te_attention(q, k, v, attention_mask=megatron_mask).view_as(q),
                              "arbitrary mask")
    return backends


def time_ms(fn) -> float:
    if not torch.cuda.is_available():  # the --smoke run: interpreter "timings" only show the plumbing works
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50)


def benchmark(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    print(f"device: {device_name} | torch {torch.__version__} | "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC | {args.dtype}, batch {args.batch}, "
          f"block {args.block_size}" + (" | decoding step (forward only)" if args.decoding else ""))
    print(f"command: {' '.join(sys.argv)}")
    header = (f"{'shape':>5} {'L':>5} {'backend':>7} | {'fwd ms':>8} {'TFLOP/s':>7} {'x Flex':>6} | "
              f"{'fwd+bwd ms':>10} {'TFLOP/s':>7} {'x Flex':>6} | notes")
    print(header)
    print("-" * len(header))
    records = []
    for shape in args.shapes:
        q_heads, kv_heads, head_dim = SMOKE_SHAPE if args.smoke else HEAD_SHAPES[shape]
        for length in args.clean_lens:
            if args.decoding:  # `length` tokens are cached; the step attends from the pending block on
                layout, q_offset = TiDARLayout.for_decoding(length, args.block_size), length
            else:
                layout, q_offset = TiDARLayout.for_training(length, args.block_size), 0
            rows = run_case(layout, q_offset, q_heads, kv_heads, head_dim, args, dtype)
            forward_flop = 4 * args.batch * q_heads * head_dim * visible_pairs(layout, q_offset)
            flex_forward, flex_both = rows.get("flex", (float("nan"),) * 2)[:2]
            for name, (forward_ms, both_ms, note) in rows.items():
                print(f"{shape:>5} {length:>5} {name:>7} | {forward_ms:8.3f} "
                      f"{forward_flop / forward_ms / 1e9:7.1f} {flex_forward / forward_ms:6.2f} | "
                      f"{both_ms:10.3f} {3.5 * forward_flop / both_ms / 1e9:7.1f} {flex_both / both_ms:6.2f} | {note}")
                records.append({"shape": shape, "clean_len": length, "backend": name, "forward_ms": forward_ms,
                                "forward_tflops": forward_flop / forward_ms / 1e9, "fwd_bwd_ms": both_ms,
                                "fwd_bwd_tflops": 3.5 * forward_flop / both_ms / 1e9,
                                "forward_vs_flex": flex_forward / forward_ms, "fwd_bwd_vs_flex": flex_both / both_ms,
                                "note": note})
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"device": device_name, "dtype": args.dtype, "block_size": args.block_size,
                       "decoding": args.decoding, "rows": records}, f, indent=2, default=str)


def run_case(layout, q_offset, q_heads, kv_heads, head_dim, args, dtype) -> dict:
    """{backend: (forward ms, forward+backward ms or nan, note)}."""
    from tidar_kernels.tidar_attention import chosen_tiles, skipped_tile_fraction

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def randn(rows, heads):
        return torch.randn(args.batch, rows, heads, head_dim, device=device, dtype=dtype,
                           requires_grad=not args.decoding)

    q = randn(layout.seq_len - q_offset, q_heads)
    k, v = randn(layout.seq_len, kv_heads), randn(layout.seq_len, kv_heads)
    grad_out = torch.randn_like(q)
    rows = {}
    backends = make_backends(layout, q_offset, q_heads, kv_heads, head_dim, args.backends, device)
    for name, (attention, note) in backends.items():
        both_ms = float("nan")
        try:  # the first calls compile (Flex) or tune tiles (kernel): keep them out of the timing
            if args.decoding:
                with torch.no_grad():
                    attention(q, k, v)
                    forward_ms = time_ms(lambda: attention(q, k, v))
            else:
                torch.autograd.grad(attention(q, k, v), (q, k, v), grad_out)
                forward_ms = time_ms(lambda: attention(q, k, v))
                both_ms = time_ms(lambda: torch.autograd.grad(attention(q, k, v), (q, k, v), grad_out))
        except torch.OutOfMemoryError:
            forward_ms = both_ms = float("nan")
            note = "out of memory"
            torch.cuda.empty_cache()
        if name == "kernel":
            tiles = chosen_tiles(q, k, layout, q_offset)["forward"]
            note = (f"fwd tiles {tiles.block_m}x{tiles.block_n}, skipped "
                    f"{skipped_tile_fraction(layout, tiles.block_m, tiles.block_n, q_offset):.1%}")
            if args.smoke:  # the interpreter run checks values too
                expected = backends["sdpa"][0](q.float(), k.float(), v.float())
                note += f", max |out - sdpa| {(attention(q, k, v).float() - expected).abs().max().item():.1e}"
        rows[name] = (forward_ms, both_ms, note)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--shapes", nargs="+", default=list(HEAD_SHAPES), choices=list(HEAD_SHAPES))
    parser.add_argument("--backends", nargs="+", default=["kernel", "flex", "sdpa", "te"],
                        choices=["kernel", "flex", "sdpa", "te"])
    parser.add_argument("--decoding", action="store_true",
                        help="time one decoding step (forward only); --clean-lens are then cached prefix lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="without a GPU: the same table for a tiny shape (L=24, block 4, 4 q / 2 kv heads, d=16, "
                             "fp32) in the Triton interpreter, with the kernel checked against SDPA")
    args = parser.parse_args()
    if args.smoke:
        args.clean_lens, args.block_size, args.shapes = [24], 4, ["tiny"]
        args.backends, args.dtype = ["kernel", "sdpa"], "fp32"

    if torch.cuda.is_available() and not args.smoke:
        benchmark(args)
        return
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be chosen before triton is first imported: re-run ourselves with it.
        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, "TRITON_INTERPRET": "1"}))
    if not torch.cuda.is_available():
        print("No CUDA device: GPU timings cannot be measured on CPU; run this script on a GPU machine.")
    if args.smoke:
        print("Smoke run in the Triton interpreter: the times below are meaningless, the errors are not.")
        benchmark(args)
    else:
        print("(pass --smoke for a tiny run of this script's code path in the Triton interpreter)")


if __name__ == "__main__":
    main()
