"""The TiDAR loss on its own (no Megatron): global per-token means whatever the micro-batch split.

Reference: (alpha * mean of the counted AR losses + mean of the counted diffusion losses) / (1 + alpha),
computed at once over the whole batch.
"""

import pytest
import torch

from tidar_megatron.training.loss import TokenCounts, combine, tidar_loss


def _batch(seed=0, rows=6, seq=24):
    g = torch.Generator().manual_seed(seed)
    per_token = torch.rand(rows, seq, generator=g, dtype=torch.float64) * 5
    ar_mask = torch.zeros(rows, seq)
    ar_mask[:, : seq // 2] = 1
    diff_mask = 1 - ar_mask
    # Loss-masked padding, unevenly spread over the rows (so micro-batches count different numbers).
    ar_mask[0, 3:12] = 0
    diff_mask[4, 12:] = 0
    diff_mask[5, 20:] = 0
    return per_token, ar_mask, diff_mask


def _reference(per_token, ar_mask, diff_mask, alpha):
    ar = (per_token * ar_mask).sum() / ar_mask.sum()
    diff = (per_token * diff_mask).sum() / diff_mask.sum()
    return ((alpha * ar + diff) / (1 + alpha)).item(), ar.item(), diff.item()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("split", [[6], [1, 5], [2, 2, 2], [3, 1, 2]])
def test_shares_of_any_split_add_up_to_the_global_loss(alpha, split):
    per_token, ar_mask, diff_mask = _batch()
    parts = list(zip(per_token.split(split), ar_mask.split(split), diff_mask.split(split)))
    counts = TokenCounts.of([{"ar_mask": a, "diff_mask": d} for _, a, d in parts])
    shares, stats = zip(*(tidar_loss(p, a, d, alpha, counts) for p, a, d in parts))
    expected, expected_ar, expected_diff = _reference(per_token, ar_mask, diff_mask, alpha)
    assert sum(s.item() for s in shares) == pytest.approx(expected, rel=1e-6)
    reported = combine(list(stats), alpha)
    assert reported["loss"] == pytest.approx(expected, rel=1e-6)
    assert reported["loss_ar"] == pytest.approx(expected_ar, rel=1e-6)
    assert reported["loss_diff"] == pytest.approx(expected_diff, rel=1e-6)


def test_gradient_weights_each_counted_token_by_its_half():
    per_token, ar_mask, diff_mask = _batch(seed=1)
    per_token.requires_grad_()
    alpha = 2.0
    share, _ = tidar_loss(per_token, ar_mask, diff_mask, alpha, TokenCounts.of([{"ar_mask": ar_mask,
                                                                                  "diff_mask": diff_mask}]))
    share.backward()
    expected = (alpha * ar_mask / ar_mask.sum() + diff_mask / diff_mask.sum()) / (1 + alpha)
    torch.testing.assert_close(per_token.grad.float(), expected.float())
    assert per_token.grad[ar_mask + diff_mask == 0].abs().max() == 0  # padding contributes nothing
