"""What the checkpoint checksums cost: SHA-256 of every file when a checkpoint is published, verified again
before it is loaded, against the save and the load themselves, measured in one run.

    python benchmarks/checkpoint_checksums.py                       # a ~60M-parameter model on this machine
    python benchmarks/checkpoint_checksums.py --model.num_layers 24 --model.hidden_size 2048 ...   # larger
    torchrun --nproc-per-node 8 benchmarks/checkpoint_checksums.py --config 1p5b --model.vocab_size 151936

Each rank hashes its share of the files (checkpoint.py), so with N ranks the checksum time is about 1/N of
the one-rank figure while the files are written by all ranks too.  `save` is `checkpoint.save` (write,
record the checksums, publish), `load` is `checkpoint.load` (verify, read); the `checksums` and `verify`
columns time those two steps alone on the same checkpoint, so the ratios are their share of save and load.
The files are in the page cache as they are right after a save; a load from cold storage reads every byte
twice (verify, then load), which the ratio here does not show.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODEL = ["--model.num_layers", "8", "--model.hidden_size", "512", "--model.num_attention_heads", "8",
                 "--model.num_query_groups", "8", "--model.ffn_hidden_size", "1536", "--model.vocab_size", "32000"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
    args, overrides = parser.parse_known_args(argv)

    from tidar_megatron import console
    from tidar_megatron.config import load_config
    from tidar_megatron.data.batch import from_token_windows
    from tidar_megatron.training import checkpoint, distributed
    from tidar_megatron.training.metrics import count_parameters
    from tidar_megatron.training.trainer import build_trainer

    console.setup()
    torch.set_num_threads(1)
    cfg = load_config(args.config, (DEFAULT_MODEL if args.config == "tiny" else []) + overrides)
    device = distributed.initialize(cfg)
    on_gpu = device == "cuda"
    trainer = build_trainer(cfg, on_gpu=on_gpu)
    t = cfg.train
    windows = torch.randint(1, cfg.model.vocab_size, (trainer.num_microbatches * t.micro_batch_size, t.seq_length + 1))
    batches = [{k: v.to(device) if torch.is_tensor(v) else v
                for k, v in from_token_windows(cfg.layout, w, cfg.tidar.mask_token_id).items()}
               for w in windows.split(t.micro_batch_size)]
    trainer.train_step(batches)  # the optimizer state exists from the first step on
    rank0 = torch.distributed.get_rank() == 0
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    parameters = count_parameters(trainer.model)

    def timed(fn):
        torch.distributed.barrier()
        start = time.perf_counter()
        fn()
        torch.distributed.barrier()
        return time.perf_counter() - start

    rows = []
    try:
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            trainer.step = repeat + 1
            save = timed(lambda: checkpoint.save(trainer, root, {"consumed_samples": 0}, keep_last=1))
            path = root / f"iter_{trainer.step:07d}"
            record = timed(lambda: checkpoint._hash_share(path))
            load = timed(lambda: checkpoint.load(trainer, path))
            verify = timed(lambda: checkpoint.verify(path))
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            if repeat:
                rows.append((save, record, load, verify, size))
    finally:
        if rank0 and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if rank0:
        save, record, load, verify, size = (sorted(column)[len(column) // 2] for column in zip(*rows))  # medians
        world = torch.distributed.get_world_size()
        where = torch.cuda.get_device_name() if on_gpu else "CPU"
        print(f"device: {where}, {world} rank(s); {parameters / 1e6:.1f}M parameters, checkpoint {size / 2**20:.0f} MiB "
              f"(model + Adam state); medians of {args.repeats} saves and loads")
        print(f"{'save s':>8}{'checksums s':>13}{'share':>8}{'load s':>8}{'verify s':>10}{'share':>8}{'SHA-256 MiB/s/rank':>20}")
        print(f"{save:>8.2f}{record:>13.2f}{record / save:>8.0%}{load:>8.2f}{verify:>10.2f}{verify / load:>8.0%}"
              f"{size / 2**20 / world / record:>20.0f}")
    distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
