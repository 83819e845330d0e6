"""The forward step that Megatron's schedules call: batch -> TiDARModel -> TiDAR loss.

Megatron's schedules divide each micro-batch's loss by the number of micro-batches, and DDP averages
gradients over data-parallel ranks; `tidar_loss` already returns the exact share of the global mean, so
the share is scaled back up by both factors here.
"""

from __future__ import annotations

from functools import partial

from .loss import TokenCounts, tidar_loss


def make_forward_step(alpha: float, counts: TokenCounts, num_microbatches: int, dp_size: int):
    def loss_func(batch, output_tensor):
        share, stats = tidar_loss(output_tensor, batch["ar_mask"], batch["diff_mask"], alpha, counts)
        return share * (num_microbatches * dp_size), stats

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        # A batch may name its own layout (e.g. TiDARLayout.causal for an AR baseline).
        output = model(batch["input_ids"], batch["position_ids"], labels=batch["targets"],
                       layout=batch.get("layout"))
        return output, partial(loss_func, batch)

    return forward_step
