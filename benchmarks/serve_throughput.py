"""Serving throughput: aggregate generated tokens/s and per-request latency at 1, 4 and 16 concurrent streams,
TiDAR against AR mode of `tidar-megatron serve`, on the same checkpoint, in one run.

    python benchmarks/serve_throughput.py                      # the toy model below, on this machine
    python benchmarks/serve_throughput.py --model <hf dir> --prompts prompts.txt --device cuda

Each level sends `--requests` streaming completions (greedy, --max-tokens each) from that many client
threads at once through the real `openai` client on loopback; the server's --max-batch equals the largest
level.  The two modes alternate level by level.  Without --model the script trains the decoder's toy
model on a repetitive corpus (tidar_megatron.testing), so that drafts are accepted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def toy_checkpoint(path: Path, block: int) -> list[list[int]]:
    """A trained toy checkpoint in `path`; returns prompts (token ids) from its corpus."""
    from tidar_megatron.testing import repetitive_corpus, trained_toy_checkpoint

    corpus = repetitive_corpus(1024, 65, list(range(3, 131)), num_cycles=4, seed=0)
    trained_toy_checkpoint(path, corpus, 300, vocab_size=256, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=4, tidar_mask_token_id=255, tidar_draft_block_size=block,
                           eos_token_id=None, max_position_embeddings=512)
    return [corpus[i, :16].tolist() for i in range(64)]


def run_level(url: str, prompts, streams: int, requests: int, max_tokens: int) -> dict:
    import openai

    latencies, tokens, lock = [], [0], threading.Lock()
    todo = list(range(requests))

    def client():
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            start = time.perf_counter()
            stream = api.completions.create(model="m", prompt=prompts[i % len(prompts)], max_tokens=max_tokens,
                                            temperature=0, stream=True)
            n = 0
            for chunk in stream:
                if chunk.usage is not None:
                    n = chunk.usage.completion_tokens
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += n

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"streams": streams, "requests": requests, "tokens": tokens[0], "seconds": wall,
            "tokens_per_s": tokens[0] / wall, "latency_mean_s": statistics.mean(latencies),
            "latency_p50_s": latencies[len(latencies) // 2], "latency_p90_s": latencies[int(0.9 * (len(latencies) - 1))]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported HF directory (default: a toy model trained here)")
    p.add_argument("--prompts", help="a text file, one prompt per line (with --model)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=16, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tidar_megatron.inference.generate import resolve_dtype
    from tidar_megatron.serving.server import BackgroundServer, build

    if args.model:
        model_dir = Path(args.model)
        prompts = Path(args.prompts).read_text().splitlines() if args.prompts else ["def main():\n"]
    else:
        model_dir = Path(tempfile.mkdtemp(prefix="serve_bench_"))
        prompts = toy_checkpoint(model_dir, args.block_size)
    dtype = resolve_dtype(None, args.device)
    servers = {}
    for mode in ("tidar", "ar"):
        app, engine = build(model_dir, mode=mode, max_batch=max(args.levels), max_model_len=512, device=args.device,
                            dtype=dtype)
        servers[mode] = BackgroundServer(app, engine).__enter__()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} torch thread(s)"
    print(f"device: {device}; model {model_dir}; {args.requests} requests per level, {args.max_tokens} tokens each")
    print(f"{'streams':>7} {'mode':>6} {'tok/s':>8} {'mean s':>8} {'p50 s':>8} {'p90 s':>8}")
    results = {"device": device, "model": str(model_dir), "levels": {}}
    try:
        for streams in args.levels:
            for mode, server in servers.items():
                row = run_level(server.url, prompts, streams, args.requests, args.max_tokens)
                results["levels"].setdefault(str(streams), {})[mode] = row
                print(f"{streams:>7} {mode:>6} {row['tokens_per_s']:>8.1f} {row['latency_mean_s']:>8.2f} "
                      f"{row['latency_p50_s']:>8.2f} {row['latency_p90_s']:>8.2f}", flush=True)
            level = results["levels"][str(streams)]
            level["tidar_over_ar"] = level["tidar"]["tokens_per_s"] / level["ar"]["tokens_per_s"]
            print(f"{'':>7} TiDAR / AR aggregate tokens/s: {level['tidar_over_ar']:.2f}x")
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
