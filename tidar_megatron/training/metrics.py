"""What a run reports: the resolved config.yaml and the parameter count, the progress line (tokens/s, ETA),
train.log, wandb, the plots, and the FLOP count behind MFU (one formula, used by benchmarks/step_time.py
too)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import yaml
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from tidar_megatron.atomic import write_atomic
from tidar_megatron.config import Config
from tidar_megatron.plots import PlotsUnavailable, draw_training

log = logging.getLogger(__name__)


def model_flops(cfg: Config, tokens_per_sample: int, samples: int) -> float:
    """Training FLOPs (forward + backward) of `samples` sequences of `tokens_per_sample` tokens: 6 N per
    token for the matmuls, plus the attention score and value products counted as dense, as MFU
    conventionally does."""
    m = cfg.model
    attn_proj = m.hidden_size * m.head_dim * (2 * m.num_attention_heads + 2 * m.num_query_groups)
    mlp = m.hidden_size * m.ffn_hidden_size * (3 if m.activation == "swiglu" else 2)
    per_token = m.num_layers * (attn_proj + mlp) + m.hidden_size * cfg.padded_vocab_size
    attention = m.num_layers * 2 * tokens_per_sample * m.num_attention_heads * m.head_dim  # QK^T and PV
    return 6 * samples * tokens_per_sample * (per_token + attention)


def model_flops_per_step(cfg: Config) -> float:
    """One global batch on the sequence the model runs on (the doubled one for TiDAR)."""
    return model_flops(cfg, cfg.layout.seq_len, cfg.train.global_batch_size)


def count_parameters(model_chunks: list) -> int:
    """Parameters of the whole model, summed over the model-parallel ranks (a collective over them), as
    Megatron-LM counts them: a tensor-parallel shard on every TP rank, a replicated parameter (norms) on
    one, the last stage's copy of a tied embedding not at all."""
    local = sum(p.numel() for chunk in model_chunks for p in chunk.parameters()
                if param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "shared", False))
    total = torch.tensor([local], dtype=torch.int64, device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return int(total.item())


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A progress line with ETA on a terminal, plain lines in <checkpoint.dir>/train.log, wandb, and the
    loss / draft-quality plot at the end.  Only rank 0 reports (`enabled`)."""

    def __init__(self, cfg: Config, start_step: int, enabled: bool):
        self.cfg, self.enabled, self.start_step = cfg, enabled, start_step
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()
        self.history: list[dict] = []
        self.validation: list[dict] = []
        self.wandb = None
        if not enabled:
            return
        run_dir = Path(cfg.checkpoint.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(run_dir / "train.log", "a")

    def start(self, parameters: int):
        """The run's first lines: the resolved config (written to <checkpoint.dir>/config.yaml, which
        `--config` reads back), the parameter count, and where wandb keeps its record."""
        if not self.enabled:
            return
        run_dir = Path(self.cfg.checkpoint.dir)
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.message(f"config: {run_dir / 'config.yaml'} (resolved); model: {parameters:,} parameters "
                     f"({parameters / 1e6:.2f}M)")
        if self.cfg.log.wandb_mode != "disabled":
            self._start_wandb(run_dir)

    def _start_wandb(self, run_dir: Path):
        """wandb keeps its full record; its own console output (about 40 lines a run) is off, and one line
        says where the run is."""
        mode = self.cfg.log.wandb_mode
        try:
            import wandb
        except ImportError:
            self.message(f"log.wandb_mode {mode}: wandb is not installed (pip install 'tidar_megatron[wandb]'); "
                         "logging to train.log only")
            return
        try:
            self.wandb = wandb.init(project=self.cfg.log.wandb_project, mode=mode, dir=str(run_dir),
                                    config=self.cfg.to_dict(), resume="allow", settings=wandb.Settings(silent=True))
        except Exception as e:  # logging must never stop a run
            log.warning("wandb disabled: %s", e)
            return
        if mode == "offline":
            where = self.wandb.settings.sync_dir
            self.message(f"wandb: offline run in {where}; upload it with `wandb sync {where}`")
        else:
            self.message(f"wandb: {self.wandb.url}")

    def step(self, step: int, metrics: dict, step_time: float):
        if not self.enabled:
            return
        t = self.cfg.train
        clean_tokens = t.global_batch_size * t.seq_length
        seen = t.global_batch_size * self.cfg.layout.seq_len
        metrics = dict(metrics, step=step, step_time=step_time, tokens_per_s=clean_tokens / step_time,
                       model_tokens_per_s=seen / step_time)
        if torch.cuda.is_available():
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            metrics["mfu"] = model_flops_per_step(self.cfg) / step_time / (
                t.peak_tflops * 1e12 * torch.distributed.get_world_size())
        self.history.append(metrics)
        done = step - self.start_step
        eta = (time.time() - self.t0) / max(done, 1) * (t.train_steps - step)
        halves = (f"ar {metrics['loss_ar']:.4f} diff {metrics['loss_diff']:.4f} "
                  if self.cfg.tidar.objective == "tidar" else "")
        doubled = f" ({metrics['model_tokens_per_s']:.0f} doubled)" if seen != clean_tokens else ""
        line = (f"step {step}/{t.train_steps} loss {metrics['loss']:.4f} {halves}lr {metrics['lr']:.2e} "
                f"gnorm {metrics['grad_norm']:.3f} {metrics['tokens_per_s']:.0f} tok/s{doubled} "
                f"{step_time * 1000:.0f} ms/step" + (f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else "")
                + f" eta {fmt_time(eta)}")
        if step % t.log_interval == 0 or step == t.train_steps:
            print(line, file=self.log_file, flush=True)
            print(("\r\033[K" if self.tty else "") + line, file=sys.stderr, flush=True)
        elif self.tty:
            print("\r\033[K" + line, end="", file=sys.stderr, flush=True)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def validated(self, step: int, metrics: dict):
        """One validation run's metrics (losses, accuracies, estimated tokens per pass)."""
        if not self.enabled:
            return
        self.validation.append(dict(metrics, step=step))
        flat = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        flat.update({f"{k}_mean": round(sum(v) / len(v), 4) for k, v in metrics.items() if isinstance(v, list) and v})
        self.message(f"step {step} validation: " + json.dumps(flat))
        if self.wandb is not None:
            self.wandb.log({f"valid/{k}": v for k, v in flat.items()}, step=step)

    def message(self, text: str):
        if self.enabled:
            print(text, file=self.log_file, flush=True)
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)

    def close(self):
        if not self.enabled:
            return
        if self.history:
            try:
                path = draw_training(self.history, self.validation, Path(self.cfg.checkpoint.dir) / "loss.png")
                self.message(f"loss curve: {path}")
            except PlotsUnavailable as e:
                self.message(str(e))
        if self.wandb is not None:
            self.wandb.finish()
        self.log_file.close()
