"""The TiDAR loss: L = (alpha * L_AR + L_diff) / (1 + alpha), each term a mean over its counted tokens.

The per-token cross-entropy comes from Megatron (vocab-parallel under TP).  Means are taken over the
*global* batch: `TokenCounts` holds the number of counted AR and diffusion targets summed over all
micro-batches and data-parallel ranks, and each micro-batch contributes its exact share, so the result does
not depend on how the batch is split into micro-batches or ranks (even with loss-masked padding).

A batch without diffusion targets (`tidar.objective: ar`, the causal layout) has L = L_AR: alpha only
weighs the two halves against each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenCounts:
    ar: float
    diff: float

    @classmethod
    def of(cls, batches, group=None) -> "TokenCounts":
        """Count the targets of `batches` (dicts with ar_mask / diff_mask), summed over `group`."""
        counts = torch.zeros(2, dtype=torch.float64)
        for b in batches:
            counts += torch.stack([b["ar_mask"].sum(), b["diff_mask"].sum()]).double().cpu()
        if group is not None and torch.distributed.get_world_size(group) > 1:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            counts = counts.to(device)
            torch.distributed.all_reduce(counts, group=group)
        return cls(ar=max(counts[0].item(), 1.0), diff=counts[1].item())


def tidar_loss(per_token_loss: torch.Tensor, ar_mask: torch.Tensor, diff_mask: torch.Tensor,
               alpha: float, counts: TokenCounts):
    """This micro-batch's share of the global TiDAR loss, and its sums for reporting.

    per_token_loss, ar_mask, diff_mask: [b, S].  Returns (loss share, {"ar": [sum, count],
    "diff": [sum, count]}) with fp32 sums, so callers can form exact global means for logging.
    """
    per_token_loss = per_token_loss.float()
    ar_sum = (per_token_loss * ar_mask).sum()
    diff_sum = (per_token_loss * diff_mask).sum()
    if counts.diff == 0:  # the AR objective
        share = ar_sum / counts.ar
    else:
        share = (alpha * ar_sum / counts.ar + diff_sum / counts.diff) / (1.0 + alpha)
    stats = {
        "ar": torch.stack([ar_sum.detach(), ar_mask.sum().float()]),
        "diff": torch.stack([diff_sum.detach(), diff_mask.sum().float()]),
    }
    return share, stats


def combine(stats: list[dict], alpha: float, group=None) -> dict[str, float]:
    """Reduce per-micro-batch stats (over `group` too) to loss_ar, loss_diff and loss."""
    if not stats:
        return {}
    total = {k: torch.stack([s[k] for s in stats]).sum(0) for k in ("ar", "diff")}
    flat = torch.cat([total["ar"], total["diff"]])
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(flat, group=group)
    loss_ar = (flat[0] / flat[1].clamp(min=1)).item()
    loss_diff = (flat[2] / flat[3].clamp(min=1)).item()
    if flat[3] == 0:  # the AR objective
        return {"loss": loss_ar, "loss_ar": loss_ar}
    return {"loss": (alpha * loss_ar + loss_diff) / (1 + alpha), "loss_ar": loss_ar, "loss_diff": loss_diff}
