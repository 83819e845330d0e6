"""The batches a run trains and validates on: megatron-core's GPT datasets, cut per data-parallel rank,
turned into TiDAR (or, for the AR objective, causal) micro-batches by the run's layout."""

from __future__ import annotations

from pathlib import Path

from tidar_megatron.config import Config
from tidar_megatron.data.batch import PackedDocuments
from tidar_megatron.data.tokenizer import Tokenizer


def split_sizes(cfg: Config) -> list[int]:
    """Samples the run draws from the train, valid and test splits (0: that split is not built)."""
    t = cfg.train
    eval_samples = t.eval_iters * t.global_batch_size * max(1, t.train_steps // max(t.eval_interval, 1) + 1)
    return [t.train_steps * t.global_batch_size, eval_samples if t.eval_interval and t.eval_iters else 0, 0]


def build_data(cfg: Config, tokenizer: Tokenizer, consumed_samples: int):
    """Train iterator (resumable) and a factory of fresh validation iterators (None without a valid split).
    Needs Megatron's parallel state."""
    from megatron.core import parallel_state as ps

    from tidar_megatron.data.dataset import TiDARBatches, build_gpt_datasets

    d, t = cfg.data, cfg.train
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    train_ds, valid_ds, _ = build_gpt_datasets(
        d.blend, d.split, t.seq_length, t.seed, tokenizer, split_sizes(cfg), cache_dir=d.cache_dir or str(Path(cfg.checkpoint.dir) / "data_cache"), eod_mask_loss=d.eod_mask_loss)

    documents = None
    if d.reset_attention_mask or d.reset_position_ids:
        documents = PackedDocuments(tokenizer.eod, attention=d.reset_attention_mask, positions=d.reset_position_ids)

    def batches(ds, consumed):
        common = dict(consumed_samples=consumed, dp_rank=dp_rank, dp_size=dp, documents=documents)
        args = (ds, t.micro_batch_size, cfg.layout, cfg.tidar.mask_token_id)
        if d.loader == "dali":
            from tidar_megatron.data.dali_loader import DaliTiDARBatches  # a clear error when DALI is absent

            return DaliTiDARBatches(*args, **common)
        return TiDARBatches(*args, **common, num_workers=d.num_workers)

    train = batches(train_ds, consumed_samples)
    valid = (lambda: batches(valid_ds, 0)) if valid_ds is not None else None
    return train, valid
