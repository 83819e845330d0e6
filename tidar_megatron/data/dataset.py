"""TiDAR training batches from megatron-core's datasets.

The dataset stays Megatron's plain LM dataset (`GPTDataset` under `BlendedMegatronDatasetBuilder`: blends,
splits, seeded shuffling, documents packed with EOD between them); the doubled TiDAR sequence is built per
micro-batch from the clean tokens by `TiDARLayout` alone.  Every rank builds its own batches, so TP ranks
(same data-parallel rank) get identical ones without extending Megatron's broadcast key set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from torch.utils.data import DataLoader, default_collate

from tidar_megatron.data.batch import PackedDocuments, from_gpt_batch
from tidar_megatron.data.blend import Blends
from tidar_megatron.data.blend import check as check_blends
from tidar_megatron.data.blend import parse as parse_blend
from tidar_megatron.data.prefix_check import VocabularyGuard
from tidar_megatron.layout import TiDARLayout


@dataclass
class TokenIds:
    """What Megatron's dataset config needs of a tokenizer, when only the ids are known."""
    eod: int
    vocab_size: int
    unique_identifiers: dict = field(default_factory=dict)

    def __post_init__(self):
        self.unique_identifiers = {"class": "TokenIds", "eod": self.eod, "vocab_size": self.vocab_size}


def build_gpt_datasets(blend: Blends | list[str], split: str, sequence_length: int, seed: int, tokenizer,
                       num_samples: list[int | None], cache_dir: str | None = None,
                       eod_mask_loss: bool = False):
    """[train, valid, test] `GPTDataset`s (or `BlendedDataset`s) of clean samples: dicts of tokens [L],
    labels [L] (next tokens), loss_mask [L], position_ids [L].

    `blend`: the run's `Blends` (blend.resolve) or Megatron's flat list [weight, prefix, ...] / [prefix, ...]
    cut by `split`.  `tokenizer` needs `eod`, `vocab_size`, `unique_identifiers` (our `Tokenizer`, or
    `TokenIds`).  `num_samples` are the samples each split must provide (None: one epoch; 0: the split is
    not built, it returns None); `cache_dir` holds the shuffle/sample index files, which are keyed by the
    config, so two builds with the same seed agree.  Call on every rank: Megatron's builder synchronises
    ranks when torch.distributed is initialised.
    """
    blends = blend if isinstance(blend, Blends) else Blends(parse_blend(blend, "blend"), None, "blend")
    for p in blends.prefixes:
        if not (os.path.exists(f"{p}.idx") and os.path.exists(f"{p}.bin")):
            raise FileNotFoundError(f"data prefix {p}: {p}.bin/.idx not found; create them with `tidar-megatron tokenize`")
    check_blends(blends, split, num_samples, sequence_length)
    if blends.whole is not None:
        sources = dict(blend=blends.whole.megatron(), split=split)
    else:
        sources = dict(blend_per_split=[b.megatron() if b and wanted != 0 else None
                                        for b, wanted in zip(blends.per_split, num_samples)])
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=sequence_length, path_to_cache=cache_dir, tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,  # TiDAR's mask comes from the layout
        mid_level_dataset_surplus=0.005, **sources)
    if blends.whole is not None:
        for i, wanted in enumerate(num_samples):
            if wanted == 0:
                config.split_matrix[i] = None
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()


class ResumableBatchSampler:
    """Megatron's pretraining order: global batch g holds samples [g*mb*dp, (g+1)*mb*dp); data-parallel
    rank r takes its slice of micro_batch_size.  Starts at `consumed_samples` (counted over all ranks)."""

    def __init__(self, total_samples: int, micro_batch_size: int, consumed_samples: int = 0,
                 dp_rank: int = 0, dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, dp_size={dp_size})")
        self.total, self.mb, self.consumed = total_samples, micro_batch_size, consumed_samples
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __iter__(self):
        step = self.mb * self.dp_size
        for start in range(self.consumed, self.total - step + 1, step):  # drop the last partial batch
            first = start + self.dp_rank * self.mb
            yield list(range(first, first + self.mb))

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.mb * self.dp_size))


class ResumableTiDARBatches:
    """Iterator of TiDAR micro-batches whose position is training state (the base of every loader).

    `state_dict()` is {"consumed_samples": n} (all data-parallel ranks together, as in Megatron); a new
    loader with `consumed_samples=n`, or `load_state_dict`, continues with the next unseen sample.  The
    count advances only when a batch is handed out, whatever workers or pipelines prefetched.  Subclasses
    supply `_clean_batches()`: collated GPTDataset batches from `self.sampler()` onwards.
    """

    def __init__(self, dataset, micro_batch_size: int, layout: TiDARLayout, mask_token_id: int,
                 consumed_samples: int = 0, dp_rank: int = 0, dp_size: int = 1,
                 documents: PackedDocuments | None = None, guard: VocabularyGuard | None = None):
        """`layout`: of one sample (the run's `Config.layout`); its clean_len is the dataset's sequence length.
        `documents`: keep the packed documents apart (then every batch carries its own layout).  `guard`:
        checks every batch's token ids against the vocabulary."""
        self.dataset, self.mb, self.layout, self.mask_token_id = dataset, micro_batch_size, layout, mask_token_id
        self.documents, self.guard = documents, guard
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples
        self._clean = None

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
        self._clean = None

    def sampler(self) -> ResumableBatchSampler:
        return ResumableBatchSampler(len(self.dataset), self.mb, self.consumed_samples, self.dp_rank, self.dp_size)

    def _clean_batches(self):
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._clean is None:
            self._clean = self._clean_batches()
        batch = next(self._clean)
        if self.guard is not None:
            self.guard(batch["tokens"], batch["labels"])
        self.consumed_samples += self.mb * self.dp_size
        return from_gpt_batch(self.layout, batch, self.mask_token_id, self.documents)


class TiDARBatches(ResumableTiDARBatches):
    """TiDAR micro-batches through torch's DataLoader (optionally with worker processes)."""

    def __init__(self, *args, num_workers: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_workers = num_workers

    def _clean_batches(self):
        return iter(DataLoader(self.dataset, batch_sampler=self.sampler(), num_workers=self.num_workers,
                               collate_fn=default_collate))
