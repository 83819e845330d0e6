"""A TiDAR micro-batch from clean tokens, built only with the layout module."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidar_megatron.layout import TiDARLayout


@dataclass(frozen=True)
class PackedDocuments:
    """How the documents packed into a sample (end-of-document tokens between them) are kept apart:
    Megatron-LM's reset_attention_mask and reset_position_ids."""
    eod_id: int
    attention: bool = True
    positions: bool = True

    def layout(self, layout: TiDARLayout, tokens: torch.Tensor) -> TiDARLayout:
        """`layout` for this batch: a document starts after every EOD but the last token's."""
        ends = (tokens[:, :-1] == self.eod_id).nonzero().tolist()
        starts = [[] for _ in range(len(tokens))]
        for sample, index in ends:
            starts[sample].append(index + 1)
        return layout.with_documents(starts, self.attention, self.positions)


def tidar_batch(layout: TiDARLayout, tokens: torch.Tensor, labels: torch.Tensor, mask_token_id: int,
                loss_mask: torch.Tensor | None = None, documents: PackedDocuments | None = None
                ) -> dict[str, torch.Tensor]:
    """tokens, labels, loss_mask: [b, L] (Megatron GPTDataset fields) -> the doubled-sequence batch:
    input_ids, targets, ar_mask, diff_mask [b, 2L] and position_ids [2L] ([b, 2L] for packed documents,
    whose per-sample layout the batch then carries as "layout")."""
    if loss_mask is None:
        loss_mask = torch.ones_like(tokens, dtype=torch.float)
    batch = {}
    if documents is not None:
        layout = batch["layout"] = documents.layout(layout, tokens)
    targets, ar_mask, diff_mask = layout.training_targets(tokens, labels, loss_mask.float())
    batch.update(input_ids=layout.training_inputs(tokens, mask_token_id),
                 position_ids=layout.position_ids.to(tokens.device), targets=targets, ar_mask=ar_mask,
                 diff_mask=diff_mask)
    return batch


def from_gpt_batch(layout: TiDARLayout, gpt_batch: dict, mask_token_id: int,
                   documents: PackedDocuments | None = None) -> dict[str, torch.Tensor]:
    """A collated megatron-core GPTDataset batch (tokens, labels, loss_mask: [b, L]) -> a TiDAR batch."""
    return tidar_batch(layout, gpt_batch["tokens"], gpt_batch["labels"], mask_token_id, gpt_batch["loss_mask"],
                       documents)


def from_token_windows(layout: TiDARLayout, windows: torch.Tensor, mask_token_id: int,
                       documents: PackedDocuments | None = None) -> dict[str, torch.Tensor]:
    """[b, L+1] token windows (inputs plus the next token) -> a TiDAR batch, every target counted."""
    return tidar_batch(layout, windows[:, :-1], windows[:, 1:], mask_token_id, documents=documents)
