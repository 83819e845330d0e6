"""TiDAR training step vs the AR step of the same model on the same clean tokens, measured in one run.

    python benchmarks/step_time.py                       # tiny preset on this machine (CPU or GPU)
    python benchmarks/step_time.py --config 1p5b --steps 10 --train.seq_length 4096   # on a GPU

The TiDAR step sees the doubled sequence (2L tokens, the layout's mask); the AR step sees the L clean
tokens with a causal mask and the AR loss only. The FLOP floor of the ratio is about 2.0x (twice the
tokens; attention more). Prints ms/step for both, the ratio, clean tokens/s and, on a GPU, MFU.
Both steps use the configured attention backend (the AR step with `TiDARLayout.causal`).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args, overrides = parser.parse_known_args(argv)

    from tidar_megatron.config import load_config
    from tidar_megatron.data.batch import from_token_windows
    from tidar_megatron.layout import TiDARLayout
    from tidar_megatron.training import distributed
    from tidar_megatron.training.loop import model_flops_per_step
    from tidar_megatron.training.trainer import build_trainer

    cfg = load_config(args.config, ["--parallel.use_distributed_optimizer", "false", *overrides])
    device = distributed.initialize(cfg)
    on_gpu = device == "cuda"
    trainer = build_trainer(cfg, on_gpu=on_gpu)
    t, L = cfg.train, cfg.train.seq_length
    mbs, n_micro = t.micro_batch_size, trainer.num_microbatches
    tidar_layout = TiDARLayout.for_training(L, cfg.tidar.draft_block_size)
    causal = TiDARLayout.causal(L)
    dev = "cuda" if on_gpu else "cpu"
    g = torch.Generator().manual_seed(0)

    def tidar_batches():
        windows = torch.randint(0, cfg.model.vocab_size, (n_micro * mbs, L + 1), generator=g)
        return [{k: v.to(dev) for k, v in from_token_windows(tidar_layout, windows[i:i + mbs],
                                                            cfg.tidar.mask_token_id).items()}
                for i in range(0, len(windows), mbs)]

    def ar_batches():
        windows = torch.randint(0, cfg.model.vocab_size, (n_micro * mbs, L + 1), generator=g)
        return [{"input_ids": w[:, :-1].to(dev), "position_ids": causal.position_ids.to(dev),
                 "targets": w[:, 1:].to(dev), "ar_mask": torch.ones(len(w), L, device=dev),
                 "diff_mask": torch.zeros(len(w), L, device=dev), "layout": causal}
                for w in windows.split(mbs)]

    def timed(make):
        for _ in range(args.warmup):
            trainer.train_step(make())
        times = []
        for _ in range(args.steps):
            batches = make()
            if on_gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.train_step(batches)
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]  # median

    backend = cfg.model.attention_backend
    # Alternate the two so that load changes on a shared machine hit both alike.
    tidar_s, ar_s = [], []
    for _ in range(2):
        tidar_s.append(timed(tidar_batches))
        ar_s.append(timed(ar_batches))
    tidar_t, ar_t = min(tidar_s), min(ar_s)
    clean = t.global_batch_size * L
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; config {args.config} {' '.join(overrides)}; L={L}, global batch "
          f"{t.global_batch_size}, micro batch {mbs}, backend {backend}")
    print(f"{'step':<8}{'ms/step':>10}{'clean tok/s':>14}")
    print(f"{'AR':<8}{ar_t * 1e3:>10.1f}{clean / ar_t:>14.0f}")
    print(f"{'TiDAR':<8}{tidar_t * 1e3:>10.1f}{clean / tidar_t:>14.0f}")
    print(f"TiDAR / AR step time: {tidar_t / ar_t:.2f}x (FLOP floor ~2.0x)")
    if on_gpu:
        mfu = model_flops_per_step(cfg) / tidar_t / (t.peak_tflops * 1e12 * torch.distributed.get_world_size())
        print(f"TiDAR MFU: {mfu:.1%} of {t.peak_tflops} TFLOP/s per GPU")
    distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
