"""The batches a run trains and validates on: megatron-core's GPT datasets, cut per data-parallel rank,
turned into TiDAR (or, for the AR objective, causal) micro-batches by the run's layout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
from megatron.core import parallel_state as ps

from tidar_megatron.config import Config
from tidar_megatron.data import blend
from tidar_megatron.data.batch import PackedDocuments
from tidar_megatron.data.dali_loader import DaliTiDARBatches
from tidar_megatron.data.dataset import TiDARBatches, build_gpt_datasets
from tidar_megatron.data.prefix_check import VocabularyGuard, check_prefix
from tidar_megatron.data.tokenizer import Tokenizer


def split_sizes(cfg: Config) -> list[int]:
    """Samples the run draws from the train, valid and test splits (0: that split is not built)."""
    t = cfg.train
    eval_samples = t.eval_iters * t.global_batch_size * max(1, t.train_steps // max(t.eval_interval, 1) + 1)
    return [t.train_steps * t.global_batch_size, eval_samples if t.eval_interval and t.eval_iters else 0, 0]


def data_summary(cfg: Config) -> list[str]:
    """The lines a run starts with: each training dataset's weight, documents, tokens and the epochs the
    run takes of it, then a note for every prefix without a sidecar (its tokenizer was not checked)."""
    blends = blend.resolve(cfg.data)
    sizes = split_sizes(cfg)
    lines = blend.describe(blend.contents(blends, cfg.data.split), sizes, cfg.train.seq_length)
    notes = [check_prefix(p).note for p in blends.prefixes]
    return lines + [f"note: {n}" for n in notes if n]


def build_data(cfg: Config, tokenizer: Tokenizer, consumed_samples: int,
               report: Callable[[str], None] | None = None):
    """Train iterator (resumable) and a factory of fresh validation iterators (None without a valid split).
    Needs Megatron's parallel state.  Global rank 0 reports `data_summary` through `report` (default: a
    line on stderr each)."""
    d, t = cfg.data, cfg.train
    if torch.distributed.get_rank() == 0:
        for line in data_summary(cfg):
            (report or (lambda text: print(text, file=sys.stderr, flush=True)))(line)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    blends = blend.resolve(d)
    train_ds, valid_ds, _ = build_gpt_datasets(
        blends, d.split, t.seq_length, t.seed, tokenizer, split_sizes(cfg),
        cache_dir=d.cache_dir or str(Path(cfg.checkpoint.dir) / "data_cache"), eod_mask_loss=d.eod_mask_loss)

    documents = None
    if d.reset_attention_mask or d.reset_position_ids:
        documents = PackedDocuments(tokenizer.eod, attention=d.reset_attention_mask, positions=d.reset_position_ids)
    guard = VocabularyGuard(blends.prefixes, tokenizer.vocab_size, f"data.tokenizer {d.tokenizer}")

    def batches(ds, consumed):
        common = dict(consumed_samples=consumed, dp_rank=dp_rank, dp_size=dp, documents=documents, guard=guard)
        args = (ds, t.micro_batch_size, cfg.layout, cfg.tidar.mask_token_id)
        if d.loader == "dali":
            return DaliTiDARBatches(*args, **common)
        return TiDARBatches(*args, **common, num_workers=d.num_workers)

    train = batches(train_ds, consumed_samples)
    valid = (lambda: batches(valid_ds, 0)) if valid_ds is not None else None
    return train, valid
