"""A TiDAR micro-batch from clean tokens, built only with the layout module."""

from __future__ import annotations

import torch

from tidar_megatron.layout import TiDARLayout


def tidar_batch(layout: TiDARLayout, tokens: torch.Tensor, labels: torch.Tensor, mask_token_id: int,
                loss_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """tokens, labels, loss_mask: [b, L] (Megatron GPTDataset fields) -> the doubled-sequence batch:
    input_ids, targets, ar_mask, diff_mask [b, 2L] and position_ids [2L]."""
    if loss_mask is None:
        loss_mask = torch.ones_like(tokens, dtype=torch.float)
    targets, ar_mask, diff_mask = layout.training_targets(tokens, labels, loss_mask.float())
    return {
        "input_ids": layout.training_inputs(tokens, mask_token_id),
        "position_ids": layout.position_ids.to(tokens.device),
        "targets": targets,
        "ar_mask": ar_mask,
        "diff_mask": diff_mask,
    }


def from_gpt_batch(layout: TiDARLayout, gpt_batch: dict, mask_token_id: int) -> dict[str, torch.Tensor]:
    """A collated megatron-core GPTDataset batch (tokens, labels, loss_mask: [b, L]) -> a TiDAR batch."""
    return tidar_batch(layout, gpt_batch["tokens"], gpt_batch["labels"], mask_token_id, gpt_batch["loss_mask"])


def from_token_windows(layout: TiDARLayout, windows: torch.Tensor, mask_token_id: int) -> dict[str, torch.Tensor]:
    """[b, L+1] token windows (inputs plus the next token) -> a TiDAR batch, every target counted."""
    return tidar_batch(layout, windows[:, :-1], windows[:, 1:], mask_token_id)
