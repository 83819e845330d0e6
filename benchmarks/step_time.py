"""TiDAR training step vs the AR step of the same model on the same clean tokens, measured in one run.

    python benchmarks/step_time.py                       # tiny preset on this machine (CPU or GPU)
    python benchmarks/step_time.py --config 1p5b --steps 10 --train.seq_length 4096   # on a GPU
    python benchmarks/step_time.py --recompute none selective full   # activation recompute's cost and saving

The TiDAR step sees the doubled sequence (2L tokens, the layout's mask, both losses); the AR step is
`tidar.objective: ar`, the same model (same initial weights) on the L clean tokens with the causal layout and
the AR loss.  The FLOP floor of the ratio is about 2.0x (twice the tokens; attention more).  Prints ms/step
for both, the ratio, clean tokens/s, the activations one micro-batch's forward keeps for backward (counted
with saved-tensor hooks, so on any device; recompute shrinks them), and on a GPU MFU and peak memory.  `--json FILE` writes
the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def saved_activation_bytes(trainer, batch, layout) -> int:
    """Bytes of the distinct storages autograd keeps from one training-mode forward of a micro-batch: the
    activations held for its backward, which recompute trades for compute."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model = trainer.model[0].module
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch["input_ids"], batch["position_ids"], labels=batch["targets"], layout=layout)
    return sum(storages.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--recompute", nargs="+", default=["none"], choices=("none", "selective", "full"),
                        help="activation recompute settings to compare (model.recompute_granularity)")
    parser.add_argument("--json", help="write the figures to this file")
    args, overrides = parser.parse_known_args(argv)

    from tidar_megatron import console
    from tidar_megatron.config import load_config
    from tidar_megatron.data.batch import PackedDocuments, from_token_windows
    from tidar_megatron.training import distributed
    from tidar_megatron.training.metrics import model_flops_per_step
    from tidar_megatron.training.trainer import build_trainer

    console.setup()
    base = ["--parallel.use_distributed_optimizer", "false", *overrides]
    if load_config(args.config, base).model.vocab_size is None:  # no tokenizer here: random token ids
        base += ["--model.vocab_size", "256"]
    cfg = load_config(args.config, base)
    device = distributed.initialize(cfg)
    on_gpu = device == "cuda"
    t, L = cfg.train, cfg.train.seq_length
    mbs = t.micro_batch_size
    dev = "cuda" if on_gpu else "cpu"
    g = torch.Generator().manual_seed(0)

    def batches_for(run_cfg, trainer):
        d = run_cfg.data
        # The recipe presets keep packed documents apart: an end-of-document token (id 0) every 1024 tokens
        # gives the per-sample layouts that such training builds every batch.
        documents = (PackedDocuments(0, d.reset_attention_mask, d.reset_position_ids)
                     if d.reset_attention_mask or d.reset_position_ids else None)

        def make():
            windows = torch.randint(1, run_cfg.model.vocab_size, (trainer.num_microbatches * mbs, L + 1), generator=g)
            if documents is not None:
                windows[:, 1023::1024] = 0
            return [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in
                     from_token_windows(run_cfg.layout, w, run_cfg.tidar.mask_token_id, documents).items()}
                    for w in windows.split(mbs)]
        return make

    def timed(trainer, make):
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

    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; config {args.config} {' '.join(overrides)}; L={L}, global batch "
          f"{t.global_batch_size}, micro batch {mbs}, backend {cfg.model.attention_backend}")
    print(f"{'recompute':<11}{'step':<7}{'ms/step':>9}{'clean tok/s':>13}{'saved act. MiB':>16}"
          + (f"{'peak GiB':>10}{'MFU':>8}" if on_gpu else ""))
    figures = {"device": device_name, "config": args.config, "overrides": overrides, "runs": {}}
    for recompute in args.recompute:
        extra = [] if recompute == "none" else ["--model.recompute_granularity", recompute]
        runs = {}
        for name, objective in (("TiDAR", "tidar"), ("AR", "ar")):
            run_cfg = load_config(args.config, base + extra + ["--tidar.objective", objective])
            torch.manual_seed(t.seed)
            trainer = build_trainer(run_cfg, on_gpu=on_gpu)
            runs[name] = (run_cfg, trainer, batches_for(run_cfg, trainer))
        times = {name: [] for name in runs}
        for _ in range(2):  # alternate, so that load changes on a shared machine hit both alike
            for name, (_, trainer, make) in runs.items():
                times[name].append(timed(trainer, make))
        for name, (run_cfg, trainer, make) in runs.items():
            seconds = min(times[name])
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            first = make()[0]
            saved = saved_activation_bytes(trainer, first, first.get("layout", run_cfg.layout))
            row = {"ms_per_step": seconds * 1e3, "clean_tokens_per_s": t.global_batch_size * L / seconds,
                   "saved_activations_mib": saved / 2**20}
            line = (f"{recompute:<11}{name:<7}{row['ms_per_step']:>9.1f}{row['clean_tokens_per_s']:>13.0f}"
                    f"{row['saved_activations_mib']:>16.1f}")
            if on_gpu:
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                row["mfu"] = model_flops_per_step(run_cfg) / seconds / (
                    t.peak_tflops * 1e12 * torch.distributed.get_world_size())
                line += f"{row['peak_memory_gib']:>10.2f}{row['mfu']:>8.1%}"
            figures["runs"].setdefault(recompute, {})[name] = row
            print(line)
        ratio = min(times["TiDAR"]) / min(times["AR"])
        figures["runs"][recompute]["tidar_over_ar"] = ratio
        print(f"{'':<11}TiDAR / AR step time: {ratio:.2f}x (FLOP floor ~2.0x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
