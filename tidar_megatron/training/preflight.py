"""Everything a run can get wrong that is checked before any process group starts.

A config that cannot work should fail in a second with one line, not after process groups, the model, DDP
and the optimizer were built on every rank: the parallel layout, the data paths, the tokenizer (which also
fixes the vocabulary: `config.resolve_vocabulary`), the checkpoint paths and the attention backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tidar_megatron.config import Config, ConfigError, resolve_vocabulary
from tidar_megatron.data import blend
from tidar_megatron.data.prefix_check import check_made_by, check_prefix
from tidar_megatron.data.tokenizer import Tokenizer
from tidar_megatron.model.attention import check_backend_available
from tidar_megatron.training.distributed import validate_layout
from tidar_megatron.training.inputs import split_sizes


def check_data(cfg: Config) -> Tokenizer:
    """The blend names whole .bin/.idx pairs made by data.tokenizer (prefix_check.check_prefix), every split
    it feeds has tokens, and the tokenizer loads; fills the vocabulary from it.  Returns it."""
    d = cfg.data
    blends = blend.resolve(d)
    prefixes = [check_prefix(prefix) for prefix in blends.prefixes]
    if not d.tokenizer:
        raise ConfigError("data.tokenizer is not set: give the tokenizer the data was tokenized with "
                          "(--data.tokenizer tok.model)")
    tokenizer = Tokenizer(d.tokenizer)
    for info in prefixes:
        check_made_by(info, tokenizer)
    resolve_vocabulary(cfg, tokenizer.text_vocab_size, tokenizer.mask_id, f"data.tokenizer {d.tokenizer}")
    blend.check(blends, d.split, split_sizes(cfg), cfg.train.seq_length)
    return tokenizer


def check_checkpoints(cfg: Config):
    c = cfg.checkpoint
    if c.init_required and not c.init_from and not _is_checkpoint(Path(c.dir)):
        raise ConfigError("this config continues an AR checkpoint (the paper's recipe; checkpoint.init_required): "
                          "set --checkpoint.init_from to the output of `tidar-megatron import-hf` (INIT_FROM for "
                          "the Slurm launchers), or train from scratch with the *-scratch preset (FROM_SCRATCH=1)")
    if c.init_from and not _is_checkpoint(Path(c.init_from)):
        raise ConfigError(f"checkpoint.init_from {c.init_from}: no checkpoint there (expected metadata.json or "
                          "iter_* folders, e.g. the output of `tidar-megatron import-hf`)")
    if c.resume not in ("auto", "none") and not _is_checkpoint(Path(c.resume)):
        raise ConfigError(f"checkpoint.resume {c.resume}: no checkpoint there; use auto (the newest in "
                          "checkpoint.dir), none, or a checkpoint directory")


def _is_checkpoint(path: Path) -> bool:
    return (path / "metadata.json").is_file() or any(path.glob("iter_*/metadata.json"))


def check_backend(cfg: Config):
    """The attention backend and the fused loss can train on this device: every combination that cannot is
    refused here in one line, not with a traceback once the first step runs."""
    on_gpu = torch.cuda.is_available() and cfg.train.device != "cpu"
    backend = cfg.model.attention_backend_on(on_gpu)
    check_backend_available(backend, on_gpu)
    if on_gpu:
        return
    use_auto = "use model.attention_backend auto (local on the CPU)"
    if backend == "flex":
        raise ConfigError(f"model.attention_backend=flex cannot train on the CPU (FlexAttention has no backward "
                          f"there); {use_auto}")
    # Triton runs on the CPU only in its interpreter, which must be chosen before triton is imported.
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "kernel" and not interpreted:
        raise ConfigError("model.attention_backend=kernel on the CPU needs Triton's interpreter: set "
                          f"TRITON_INTERPRET=1 (slow, for tests) or {use_auto}")
    if cfg.model.fused_loss and not interpreted:
        raise ConfigError("model.fused_loss (a Triton kernel) on the CPU needs Triton's interpreter: set "
                          "TRITON_INTERPRET=1 (slow, for tests) or --model.fused_loss false")


def check(cfg: Config, world_size: int) -> Tokenizer:
    """All of the above; `world_size` is the launcher's.  Returns the tokenizer."""
    validate_layout(cfg, world_size)
    tokenizer = check_data(cfg)
    check_checkpoints(cfg)
    check_backend(cfg)
    return tokenizer
