"""The forward step that Megatron's schedules call: batch -> TiDARModel -> TiDAR loss.

Megatron's schedules divide each micro-batch's loss by the number of micro-batches, and DDP averages
gradients over data-parallel ranks; `tidar_loss` already returns the exact share of the global mean, so
the share is scaled back up by both factors here.

With `score=True` (validation) the model also returns each row's (vocab-parallel) argmax, from which
`validation.draft_quality` counts accuracies and the acceptance a greedy decoder would see.
"""

from __future__ import annotations

from functools import partial

import torch

from tidar_megatron.layout import TiDARLayout
from tidar_megatron.training.loss import TokenCounts, tidar_loss
from tidar_megatron.training.validation import draft_quality


def make_forward_step(layout: TiDARLayout, alpha: float, counts: TokenCounts, num_microbatches: int,
                      dp_size: int, score: bool = False):
    """`layout`: of every sample of the batches (the run's `Config.layout`), handed to the model, unless a
    batch brings its own (packed documents)."""

    def loss_func(batch, output_tensor):
        per_token = output_tensor[..., 0] if score else output_tensor
        share, stats = tidar_loss(per_token, batch["ar_mask"], batch["diff_mask"], alpha, counts)
        if score:
            stats.update(draft_quality(batch.get("layout", layout), output_tensor[..., 1].long(), batch["targets"],
                                       batch["ar_mask"], batch["diff_mask"]))
        return share * (num_microbatches * dp_size), stats

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if torch.cuda.is_available():  # loaders hand out host tensors (DALI's are on the GPU already)
            batch = {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        # A batch of packed documents carries its own per-sample layout.
        output = model(batch["input_ids"], batch["position_ids"], labels=batch["targets"],
                       layout=batch.get("layout", layout), score=score)
        return output, partial(loss_func, batch)

    return forward_step
