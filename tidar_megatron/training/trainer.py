"""One TiDAR training step on Megatron-core: DDP, the Megatron optimizer, the LR schedule and the
pipeline schedules.  `train.py` runs the loop around it; the parity tests call it directly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from tidar_megatron.config import Config, TrainConfig
from tidar_megatron.model import build_model
from tidar_megatron.training import loss, validation
from tidar_megatron.training.forward_step import make_forward_step


@dataclass
class Trainer:
    cfg: Config
    model: list            # DDP-wrapped model chunks of this rank
    optimizer: object
    scheduler: OptimizerParamScheduler
    step: int = 0

    @property
    def dp_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    @property
    def num_microbatches(self) -> int:
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.dp_size)

    def train_step(self, microbatches: list[dict]) -> dict:
        """Forward/backward over this rank's micro-batches of one global batch, then an optimizer step.

        Returns loss, loss_ar, loss_diff (global means), grad_norm, lr and whether the update was skipped."""
        if len(microbatches) != self.num_microbatches:
            raise ValueError(f"expected {self.num_microbatches} micro-batches per step, got {len(microbatches)}")
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        stats = self._forward_backward(microbatches, forward_only=False)
        metrics = _broadcast_from_last_stage(
            loss.combine(stats, self.cfg.tidar.alpha, parallel_state.get_data_parallel_group()))
        # Megatron's fp32/bf16 optimizers apply NaN gradients; skip such a step ourselves.
        update_ok, grad_norm = False, float("nan")
        if self._all_finite(metrics["loss"]):
            update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
        self.step += 1  # as in Megatron, a skipped update still uses up its iteration and its data
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       lr=self.optimizer.param_groups[0]["lr"], skipped=not update_ok)
        return metrics

    def _all_finite(self, loss_value: float) -> bool:
        """Loss and every rank's local gradients finite (checked on the DDP grad buffers)."""
        ok = math.isfinite(loss_value) and all(
            bool(torch.isfinite(buf.grad_data).all()) for chunk in self.model for buf in chunk.buffers)
        flag = torch.tensor([0.0 if ok else 1.0], device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() == 0.0

    @torch.no_grad()
    def evaluate(self, microbatches: list[dict]) -> dict:
        """Losses and draft quality (validation.py) over `microbatches` (any multiple of the pipeline size)."""
        for chunk in self.model:
            chunk.eval()
        try:
            stats = self._forward_backward(microbatches, forward_only=True, score=True)
        finally:
            for chunk in self.model:
                chunk.train()
        group = parallel_state.get_data_parallel_group()
        metrics = loss.combine(stats, self.cfg.tidar.alpha, group) if stats else {}
        if stats:
            metrics.update(validation.combine(stats, group))
        return _broadcast_from_last_stage(metrics)

    def _forward_backward(self, microbatches, forward_only: bool, score: bool = False) -> list[dict]:
        counts = loss.TokenCounts.of(microbatches, parallel_state.get_data_parallel_group())
        forward_step = make_forward_step(self.cfg.layout, self.cfg.tidar.alpha, counts, len(microbatches),
                                         self.dp_size, score=score)
        # Interleaved schedules take one iterator per model chunk; every chunk reads the same batches.
        iters = [iter(microbatches) for _ in self.model] if len(self.model) > 1 else iter(microbatches)
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iters,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(microbatches),
            seq_length=self.cfg.layout.seq_len,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )


def _broadcast_from_last_stage(metrics: dict) -> dict:
    """Loss values live on the last pipeline stage; give every rank the same numbers."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    box = [metrics]
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast_object_list(box, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def build_trainer(cfg: Config, on_gpu: bool) -> Trainer:
    """Model chunks -> Megatron DDP -> Megatron optimizer (distributed when configured) -> LR schedule.
    Needs `distributed.initialize(cfg)` first."""
    t, p = cfg.train, cfg.parallel
    chunks = build_model(cfg, on_gpu=on_gpu)
    if on_gpu:
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=p.use_distributed_optimizer,
    )
    model = [
        DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c,
                                disable_bucketing=(i > 0))
        for i, c in enumerate(chunks)
    ]
    for m in model:
        m.broadcast_params()
    config = model[0].config
    config.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad,
        bf16=t.bf16, params_dtype=config.params_dtype,
        use_distributed_optimizer=p.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    # On resume, which schedule wins where the checkpoint's differs (resume_check.py refused it otherwise).
    rule = cfg.checkpoint.lr_schedule
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, **lr_schedule(t),
        wsd_decay_steps=max(t.train_steps // 10, 1) if t.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if t.lr_decay_style == "WSD" else None,
        override_opt_param_scheduler=rule == "config", use_checkpoint_opt_param_scheduler=rule == "checkpoint",
    )
    return Trainer(cfg, model, optimizer, scheduler)


def lr_schedule(t: TrainConfig) -> dict:
    """The schedule of `t` as OptimizerParamScheduler takes it, and records it in its state_dict (the names
    and units resume_check.py compares a checkpoint's with)."""
    return dict(max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps, lr_decay_steps=t.train_steps,
                lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
                wd_incr_steps=t.train_steps, wd_incr_style="constant")
