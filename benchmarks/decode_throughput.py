"""AR vs TiDAR decoding throughput at batch 1 on one Hugging Face checkpoint, measured in one run.

    python benchmarks/decode_throughput.py --model <hf dir> [--block-size B] [--max-new-tokens N]
    python benchmarks/decode_throughput.py            # CPU: trains a tiny model on a repetitive corpus first

Without --model, a small Qwen2-style model is trained with the TiDAR loss on walks around a fixed cycle of
tokens, so that its drafts get accepted; its prompts are slices of that corpus.  With --model, prompts are
random token ids unless --prompt-ids is given.  Prints a table: tokens/s, tokens per forward pass (T/NFE),
ms per pass, and the TiDAR / AR ratios.  Record the numbers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from tidar_megatron.inference.decoding import ATTENTION, Decoder
from tidar_megatron.inference.generate import DTYPES, parse_ids, resolve_dtype
from tidar_megatron.testing import repetitive_corpus, trained_toy_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="Hugging Face directory; default: train a toy model first")
    p.add_argument("--block-size", type=int, help="default: the checkpoint's tidar_draft_block_size")
    p.add_argument("--mask-token-id", type=int)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-ids", action="append", help="comma-separated ids; repeat for more prompts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile + CUDA graphs (GPU only)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--attention", choices=ATTENTION, default="sdpa",
                   help="decoding attention: SDPA with the dense mask, or the TiDAR Triton kernel (GPU)")
    toy = p.add_argument_group("toy model (without --model)")
    toy.add_argument("--hidden-size", type=int, default=64)
    toy.add_argument("--num-layers", type=int, default=2)
    toy.add_argument("--train-block-size", type=int, default=4)
    toy.add_argument("--train-steps", type=int, default=400)
    toy.add_argument("--train-seq-len", type=int, default=64)
    return p.parse_args(argv)


def train_toy_model(args, model_dir):
    """Returns prompts drawn from the training corpus."""
    vocab, mask_token_id = 256, 255
    corpus = repetitive_corpus(2048, args.train_seq_len + 1, list(range(3, 3 + 128)), seed=0)
    started = time.perf_counter()
    losses = trained_toy_checkpoint(model_dir, corpus, args.train_steps, vocab_size=vocab,
                                    hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
                                    num_hidden_layers=args.num_layers, num_attention_heads=4, num_key_value_heads=2,
                                    tidar_mask_token_id=mask_token_id, tidar_draft_block_size=args.train_block_size)
    print(f"trained {args.train_steps} steps in {time.perf_counter() - started:.0f}s, "
          f"final TiDAR loss {losses[-1]:.3f}")
    return [corpus[i, :8].tolist() for i in range(args.num_prompts)]


def measure(decoder, prompts, max_new_tokens, modes=("ar", "tidar")):
    """Per mode: tokens/s, T/NFE, ms per pass, acceptance histogram.  The modes alternate prompt by prompt,
    so that a change in machine load (shared CPUs) hits both alike."""
    totals = {mode: dict(tokens=0, passes=0, seconds=0.0, histogram=[0] * decoder.block_size) for mode in modes}
    for mode in modes:
        decoder.generate(prompts[0], max_new_tokens, mode=mode)  # warm-up (allocation, compilation)
    for prompt in prompts:
        for mode in modes:
            stats, total = decoder.generate(prompt, max_new_tokens, mode=mode).stats, totals[mode]
            total["tokens"] += stats.new_tokens
            total["passes"] += stats.forward_passes
            total["seconds"] += stats.seconds
            total["histogram"] = [h + n for h, n in zip(total["histogram"], stats.acceptance_histogram)]
    return {mode: dict(tokens_per_second=t["tokens"] / t["seconds"], tokens_per_pass=t["tokens"] / t["passes"],
                       ms_per_pass=1000 * t["seconds"] / t["passes"], histogram=t["histogram"])
            for mode, t in totals.items()}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or scratch
        prompts = None if args.model else train_toy_model(args, scratch)
        if args.prompt_ids:
            prompts = [parse_ids(p) for p in args.prompt_ids]
        elif prompts is None:
            g = torch.Generator().manual_seed(0)
            prompts = torch.randint(0, 1000, (args.num_prompts, 16), generator=g).tolist()
        dtype = resolve_dtype(args.dtype, args.device)
        decoder = Decoder.from_pretrained(model_dir, dtype, args.device, args.mask_token_id, args.block_size,
                                          args.compile, args.attention)
        results = measure(decoder, prompts, args.max_new_tokens)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {device}; dtype {dtype}; batch 1; block size {decoder.block_size}; "
          f"{len(prompts)} prompts x {args.max_new_tokens} new tokens; compile={decoder.compiled}; "
          f"attention {decoder.attention}")
    print(f"{'mode':<6} {'tokens/s':>10} {'T/NFE':>7} {'ms/pass':>8}  accepted-per-pass histogram")
    for mode, r in results.items():
        hist = " ".join(f"{a}:{n}" for a, n in enumerate(r["histogram"], 1) if n) if mode == "tidar" else ""
        print(f"{mode:<6} {r['tokens_per_second']:>10.1f} {r['tokens_per_pass']:>7.2f} "
              f"{r['ms_per_pass']:>8.2f}  {hist}")
    ar, tidar = results["ar"], results["tidar"]
    print(f"TiDAR / AR: tokens/s x{tidar['tokens_per_second'] / ar['tokens_per_second']:.2f}, "
          f"T/NFE x{tidar['tokens_per_pass'] / ar['tokens_per_pass']:.2f}, "
          f"pass cost x{tidar['ms_per_pass'] / ar['ms_per_pass']:.2f}")


if __name__ == "__main__":
    main()
