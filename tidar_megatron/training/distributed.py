"""Process groups and Megatron parallel state, from torchrun's or Slurm's environment."""

from __future__ import annotations

import datetime
import os

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from tidar_megatron.compat import cpu as cpu_compat
from tidar_megatron.config import Config, ConfigError
from tidar_megatron.model import attention
from tidar_megatron.net import free_port


def _env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else Slurm's, else a single process."""
    if "RANK" in os.environ:
        if "WORLD_SIZE" not in os.environ:
            raise ConfigError("RANK is set but WORLD_SIZE is not: launch with torchrun, or set both")
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def env_world_size() -> int:
    return _env_rank_world()[1]


def initialize(cfg: Config, timeout_minutes: int = 30) -> str:
    """Start torch.distributed (NCCL on GPUs, gloo on CPU) and Megatron's TP/PP/DP groups.

    Returns the device type ('cuda' or 'cpu').  Check `validate_layout` before calling this."""
    device = cpu_compat.maybe_enable(cfg.train.device)
    rank, world, local_rank = _env_rank_world()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        # A lone process (quickstart, tests, conversion) takes a free port so that several can run at once.
        os.environ.setdefault("MASTER_PORT", str(free_port() if world == 1 else 29500))
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(
            backend="nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes))
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context_parallel,
    )
    model_parallel_cuda_manual_seed(cfg.train.seed)
    return device


def validate_layout(cfg: Config, world_size: int):
    """Reject parallel layouts that cannot work, before any process group starts."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    model_parallel = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    problems = []
    if world_size % model_parallel:
        problems.append(f"world size {world_size} is not divisible by TP*PP*CP = {model_parallel}")
    dp = max(world_size // model_parallel, 1)
    if m.num_attention_heads % p.tensor_parallel or m.num_query_groups % p.tensor_parallel:
        problems.append(f"model.num_attention_heads ({m.num_attention_heads}) and model.num_query_groups "
                        f"({m.num_query_groups}) must be divisible by parallel.tensor_parallel ({p.tensor_parallel})")
    if m.ffn_hidden_size % p.tensor_parallel:
        problems.append(f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by parallel.tensor_parallel "
                        f"({p.tensor_parallel})")
    layers_per_stage = p.pipeline_parallel * (p.virtual_pipeline or 1)
    if m.num_layers % layers_per_stage:
        problems.append(f"model.num_layers ({m.num_layers}) must be divisible by pipeline_parallel x "
                        f"virtual_pipeline ({layers_per_stage})")
    if t.global_batch_size % (t.micro_batch_size * dp):
        problems.append(f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
                        f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp})")
    if p.sequence_parallel and cfg.layout.seq_len % p.tensor_parallel:
        problems.append(f"with sequence parallelism the model's sequence ({cfg.layout.seq_len} tokens for "
                        f"train.seq_length {t.seq_length}) must be divisible by parallel.tensor_parallel")
    if p.sequence_parallel and not (attention.te_available() or attention.apex_available()):
        problems.append("parallel.sequence_parallel needs TransformerEngine on a GPU or NVIDIA apex (their "
                        "norms support it; torch's do not): set parallel.sequence_parallel false")
    num_micro = t.global_batch_size // max(t.micro_batch_size * dp, 1)
    if p.virtual_pipeline and num_micro % p.pipeline_parallel:
        # Interleaved 1F1B walks the micro-batches in groups of PP per model chunk.
        problems.append(f"with parallel.virtual_pipeline the micro-batches per step (global_batch_size / "
                        f"(micro_batch_size x data-parallel size) = {num_micro}) must be a multiple of "
                        f"parallel.pipeline_parallel ({p.pipeline_parallel})")
    if problems:
        raise ConfigError("invalid parallel layout: " + "; ".join(problems))
    return dp


def destroy():
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
