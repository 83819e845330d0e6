"""The pretraining loop: `tidar-megatron train --config <preset> [--section.field value ...]`.

Reads top to bottom: validate the config, start process groups, build the trainer, resume or
initialise, then step / log / validate / checkpoint until done or preempted (SIGTERM, SIGUSR1: finish the
step, save, exit 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

import torch

from . import checkpoint
from .attention import BackendUnavailable
from .config import Config, ConfigError, load_config
from .data.tokenizer import TokenizerError

log = logging.getLogger("tidar_megatron.train")


class Preemption:
    """Turns SIGTERM / SIGUSR1 into a flag that the loop checks after each step (on every rank together)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([float(self.requested)], device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def build_data(cfg: Config, consumed_samples: int):
    """Train iterator (resumable) and a factory of fresh validation iterators."""
    from megatron.core import parallel_state as ps

    from .data.dataset import TiDARBatches, build_gpt_datasets
    from .data.tokenizer import Tokenizer

    d, t = cfg.data, cfg.train
    if not d.blend:
        raise ConfigError("data.blend is empty: point it at tokenized data (prefixes of .bin/.idx made by "
                          "tidar-tokenize), e.g. --data.blend runs/data/corpus")
    if d.tokenizer:
        tokenizer = Tokenizer(d.tokenizer)
    else:
        raise ConfigError("data.tokenizer is not set: give the tokenizer the data was tokenized with")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size}, {d.tokenizer}): set --model.vocab_size "
                          f"{tokenizer.vocab_size}")
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    eval_samples = t.eval_iters * t.global_batch_size * max(1, t.train_steps // max(t.eval_interval, 1) + 1)
    train_ds, valid_ds, _ = build_gpt_datasets(
        d.blend, d.split, t.seq_length, t.seed, tokenizer,
        [t.train_steps * t.global_batch_size, eval_samples if t.eval_interval else None, None],
        cache_dir=d.cache_dir or str(Path(cfg.checkpoint.dir) / "data_cache"), eod_mask_loss=d.eod_mask_loss)

    def batches(ds, consumed):
        common = dict(consumed_samples=consumed, dp_rank=dp_rank, dp_size=dp)
        args = (ds, t.micro_batch_size, cfg.tidar.draft_block_size, cfg.tidar.mask_token_id)
        if d.loader == "dali":
            from .data.dali_loader import DaliTiDARBatches  # raises a clear error when DALI is absent

            return DaliTiDARBatches(*args, **common)
        return TiDARBatches(*args, **common, num_workers=d.num_workers)

    train = batches(train_ds, consumed_samples)
    valid = (lambda: batches(valid_ds, 0)) if valid_ds is not None else None
    return train, valid


class Progress:
    """A progress line with ETA on a terminal, plain lines in <checkpoint.dir>/train.log, wandb."""

    def __init__(self, cfg: Config, start_step: int, enabled: bool):
        self.cfg, self.enabled, self.start_step = cfg, enabled, start_step
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()
        self.history: list[dict] = []
        self.wandb = None
        if not enabled:
            return
        run_dir = Path(cfg.checkpoint.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(run_dir / "train.log", "a")
        if cfg.log.wandb_mode != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.log.wandb_project, mode=cfg.log.wandb_mode,
                                        dir=str(run_dir), config=cfg.to_dict(), resume="allow")
            except Exception as e:  # logging must never stop a run
                log.warning("wandb disabled: %s", e)

    def step(self, step: int, metrics: dict, step_time: float):
        if not self.enabled:
            return
        t = self.cfg.train
        clean_tokens = t.global_batch_size * t.seq_length
        metrics = dict(metrics, step=step, step_time=step_time,
                       tokens_per_s=clean_tokens / step_time, doubled_tokens_per_s=2 * clean_tokens / step_time)
        if torch.cuda.is_available():
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            metrics["mfu"] = model_flops_per_step(self.cfg) / step_time / (
                t.peak_tflops * 1e12 * torch.distributed.get_world_size())
        self.history.append(metrics)
        done = step - self.start_step
        eta = (time.time() - self.t0) / max(done, 1) * (t.train_steps - step)
        line = (f"step {step}/{t.train_steps} loss {metrics['loss']:.4f} ar {metrics['loss_ar']:.4f} "
                f"diff {metrics['loss_diff']:.4f} lr {metrics['lr']:.2e} gnorm {metrics['grad_norm']:.3f} "
                f"{metrics['tokens_per_s']:.0f} tok/s ({metrics['doubled_tokens_per_s']:.0f} doubled) "
                f"{step_time * 1000:.0f} ms/step" + (f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else "")
                + f" eta {_fmt_time(eta)}")
        if step % t.log_interval == 0 or step == t.train_steps:
            print(line, file=self.log_file, flush=True)
            print(("\r\033[K" if self.tty else "") + line, file=sys.stderr, flush=True)
        elif self.tty:
            print("\r\033[K" + line, end="", file=sys.stderr, flush=True)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def message(self, text: str):
        if self.enabled:
            print(text, file=self.log_file, flush=True)
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)

    def close(self):
        if not self.enabled:
            return
        if self.history:
            from .plots import draw_losses

            path = draw_losses(self.history, Path(self.cfg.checkpoint.dir) / "loss.png")
            self.message(f"loss curve: {path}")
        if self.wandb is not None:
            self.wandb.finish()
        self.log_file.close()


def model_flops_per_step(cfg: Config) -> float:
    """Training FLOPs of one global batch on the doubled sequence (6 N per token for the matmuls, plus
    the attention score and value products counted as dense, as MFU conventionally does)."""
    m, t = cfg.model, cfg.train
    s = 2 * t.seq_length
    attn_proj = m.hidden_size * m.head_dim * (2 * m.num_attention_heads + 2 * m.num_query_groups)
    mlp = m.hidden_size * m.ffn_hidden_size * (3 if m.activation == "swiglu" else 2)
    per_token = m.num_layers * (attn_proj + mlp) + m.hidden_size * cfg.padded_vocab_size
    attention = m.num_layers * 2 * s * m.num_attention_heads * m.head_dim  # QK^T and PV per token
    return 6 * t.global_batch_size * s * (per_token + attention)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train(cfg: Config) -> dict:
    from . import distributed
    from .trainer import build_trainer

    distributed.validate_layout(cfg, distributed.env_world_size())  # before any process group starts
    device = distributed.initialize(cfg)
    trainer = build_trainer(cfg, on_gpu=device == "cuda")
    rank0 = torch.distributed.get_rank() == 0
    ckpt_dir = Path(cfg.checkpoint.dir)

    data_state = None
    if cfg.checkpoint.resume == "auto":
        data_state = checkpoint.resume(trainer, ckpt_dir)
    elif cfg.checkpoint.resume != "none":
        data_state = checkpoint.load(trainer, cfg.checkpoint.resume)
    if data_state is None and cfg.checkpoint.init_from:
        checkpoint.load_model_weights(trainer.model, cfg.checkpoint.init_from)
        trainer.optimizer.reload_model_params()  # the fp32 main copies (bf16 runs) must follow the new weights
    train_iter, valid_factory = build_data(cfg, (data_state or {}).get("consumed_samples", 0))

    progress = Progress(cfg, trainer.step, enabled=rank0)
    if data_state is not None:
        progress.message(f"resumed at step {trainer.step} (consumed samples {train_iter.consumed_samples})")
    preemption = Preemption()
    nan_streak, result, last_saved = 0, {}, None
    async_saves = checkpoint.AsyncSaves(Preemption.SIGNALS) if cfg.checkpoint.async_save else None

    def save(wait: bool = False):
        """Periodic saves may finish in the background; the last one before exiting is waited for."""
        nonlocal last_saved
        checkpoint.save(trainer, ckpt_dir, train_iter.state_dict(), cfg.checkpoint.keep_last, async_saves)
        if async_saves is not None and wait:
            async_saves.wait()
        last_saved = trainer.step

    try:
        while trainer.step < cfg.train.train_steps:
            start = time.time()
            micro = [next(train_iter) for _ in range(trainer.num_microbatches)]
            metrics = trainer.train_step(micro)
            if async_saves is not None:
                async_saves.poll()
            if metrics["skipped"]:
                nan_streak += 1
                progress.message(f"step {trainer.step}: non-finite loss or gradients, update skipped "
                                 f"({nan_streak} in a row)")
                if nan_streak > cfg.train.max_nan_skips:  # every rank sees the same broadcast loss
                    if async_saves is not None:
                        async_saves.wait()  # keep the last good checkpoint that is still being written
                    raise RuntimeError(f"{nan_streak} consecutive non-finite steps (train.max_nan_skips="
                                       f"{cfg.train.max_nan_skips}); lower train.lr or check the data")
            else:
                nan_streak = 0
            progress.step(trainer.step, metrics, time.time() - start)
            result = metrics
            if valid_factory and cfg.train.eval_interval and trainer.step % cfg.train.eval_interval == 0:
                result["valid"] = evaluate(trainer, valid_factory(), cfg.train.eval_iters)
                progress.message(f"step {trainer.step} validation: " + json.dumps(
                    {k: round(v, 4) for k, v in result["valid"].items()}))
            exit_now = bool(cfg.train.exit_interval) and trainer.step % cfg.train.exit_interval == 0
            if preemption.agreed() or exit_now:
                save(wait=True)
                progress.message(f"{'exit interval' if exit_now else 'preempted'}: saved step {trainer.step} "
                                 f"to {ckpt_dir}; exiting")
                return dict(result, stopped_early=True, history=progress.history)
            if cfg.checkpoint.interval and trainer.step % cfg.checkpoint.interval == 0:
                save()
        if last_saved != trainer.step:
            save()
        if async_saves is not None:
            async_saves.wait()
        progress.message(f"done: step {trainer.step}, checkpoint {ckpt_dir / f'iter_{trainer.step:07d}'}")
        return dict(result, history=progress.history)
    finally:
        progress.close()


def evaluate(trainer, batches, iters: int) -> dict:
    totals = {"loss": 0.0, "loss_ar": 0.0, "loss_diff": 0.0}
    for _ in range(iters):
        metrics = trainer.evaluate([next(batches) for _ in range(trainer.num_microbatches)])
        for k in totals:
            totals[k] += metrics[k] / iters
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidar-megatron train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines drown the progress
    try:
        cfg = load_config(args.config, overrides)
        train(cfg)
    except (ConfigError, ValueError, FileNotFoundError, checkpoint.CheckpointError, TokenizerError,
            BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            from . import distributed

            distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
