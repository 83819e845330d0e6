"""Validation: the losses, and how good the drafts are, from the same forward pass.

Besides the AR and diffusion losses, a validation run counts (exact sums over every micro-batch and
data-parallel rank, vocab-parallel argmax under TP):

  ar_accuracy         next-token accuracy of the clean half
  draft_accuracy      per offset r = 0..B-1 inside a draft block: the mask token's argmax equals the token
  draft_agreement     per offset r: the mask token's argmax equals the AR head's argmax at that position
                      (the test greedy verification applies)
  est_tokens_per_pass per full draft block: 1 + the number of leading drafts r = 1, 2, ... that agree with
                      the AR argmax, averaged over blocks

`est_tokens_per_pass` replays greedy TiDAR decoding's acceptance rule on the validation windows: a block
drafts from the clean prefix before it, exactly as the block drafted in the previous decoding pass does,
and slot 0 is the token the AR head commits anyway.  It differs from the decoder's T/NFE in two ways: the
context is the data (teacher forcing), not the model's own greedy output, and every block starts at a
multiple of B while decoding blocks start wherever the last pass stopped.  It tracks the real figure
closely once the drafts are good; `tidar-megatron evaluate` measures the real one.
"""

from __future__ import annotations

import torch

from tidar_megatron.layout import TiDARLayout


def draft_quality(layout: TiDARLayout, argmax: torch.Tensor, targets: torch.Tensor, ar_mask: torch.Tensor,
                  diff_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums for one micro-batch (argmax, targets, masks: [b, S] on the layout's rows); see `combine`."""
    hits = (argmax == targets).float()
    clean = layout.clean_len
    stats = {"ar_hits": torch.stack([(hits[:, :clean] * ar_mask[:, :clean]).sum(), ar_mask[:, :clean].sum()])}
    if layout.num_blocks == 0:
        return stats
    B = layout.block_size
    offsets = layout.draft_offsets.to(argmax.device)[clean:]             # [S - clean], r of each mask row
    positions = layout.source_index.to(argmax.device)[clean:]              # the clean index each drafts
    diff_hits, diff_w = hits[:, clean:], diff_mask[:, clean:].float()
    # The AR head's prediction of position p sits on clean row p - 1; position 0 has none.
    ar_row = (positions - 1).clamp(min=0)
    agree = (argmax[:, clean:] == argmax[:, ar_row]).float()
    agree_w = diff_w * ar_mask[:, ar_row] * (positions >= 1).float()
    one_hot = torch.nn.functional.one_hot(offsets, B).float()               # [S - clean, B]
    stats.update(draft_hits=torch.stack([(diff_hits * diff_w).sum(0) @ one_hot, diff_w.sum(0) @ one_hot]),
                 agreement=torch.stack([(agree * agree_w).sum(0) @ one_hot, agree_w.sum(0) @ one_hot]))
    rows = layout.full_block_rows.to(argmax.device) - clean                 # [n, B] rows of the full blocks
    if rows.numel():
        lead = agree[:, rows][..., 1:].cumprod(-1).sum(-1)                   # [b, n] leading agreeing drafts
        usable = (agree_w[:, rows][..., 1:] > 0).all(-1).float()
        stats["accepted"] = torch.stack([((1 + lead) * usable).sum(), usable.sum()])
    return stats


def combine(stats: list[dict], group=None) -> dict:
    """Per-micro-batch `draft_quality` sums (and over `group`) -> accuracies and the estimate."""
    keys = [k for k in ("ar_hits", "draft_hits", "agreement", "accepted") if stats and k in stats[0]]
    if not keys:
        return {}
    total = {k: torch.stack([s[k].double() for s in stats]).sum(0) for k in keys}
    flat = torch.cat([total[k].flatten() for k in keys])
    if group is not None and torch.distributed.get_world_size(group) > 1:
        flat = flat.to("cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(flat, group=group)
    flat, out, i = flat.cpu(), {}, 0
    for k in keys:
        n = total[k].numel()
        value, count = flat[i:i + n].view(2, -1) if total[k].dim() == 2 else flat[i:i + n]
        i += n
        ratio = (value / count.clamp(min=1)).tolist()
        if k == "ar_hits":
            out["ar_accuracy"] = ratio
        elif k == "accepted":
            out["est_tokens_per_pass"] = ratio
        else:
            out["draft_accuracy" if k == "draft_hits" else "draft_agreement"] = ratio
    return out


def validate(trainer, batches, iters: int) -> dict:
    """Losses and draft quality over `iters` global batches of `batches`, as exact global means."""
    return trainer.evaluate([next(batches) for _ in range(iters * trainer.num_microbatches)])
