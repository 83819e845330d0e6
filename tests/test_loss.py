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


def test_draft_quality_counts_match_a_brute_force_loop():
    """validation.draft_quality against per-token loops over the layout's rows."""
    from tidar_megatron.layout import TiDARLayout
    from tidar_megatron.training.validation import combine, draft_quality

    L, B, V, b = 10, 4, 5, 3  # blocks [0,4) [4,8) [8,10): the last one is short
    layout = TiDARLayout.for_training(L, B)
    g = torch.Generator().manual_seed(0)
    argmax = torch.randint(0, V, (b, layout.seq_len), generator=g)
    targets = torch.randint(0, V, (b, layout.seq_len), generator=g)
    ar_mask = torch.zeros(b, layout.seq_len)
    ar_mask[:, :L] = 1
    ar_mask[0, 2] = 0
    diff_mask = torch.zeros(b, layout.seq_len)
    diff_mask[:, L:] = 1
    diff_mask[1, L + 5] = 0
    got = combine([draft_quality(layout, argmax, targets, ar_mask, diff_mask)])
    hits = sum(int(argmax[i, q] == targets[i, q]) for i in range(b) for q in range(L) if ar_mask[i, q])
    assert got["ar_accuracy"] == pytest.approx(hits / ar_mask.sum().item())
    positions = layout.position_ids.tolist()
    for r in range(B):
        rows = [j for j in range(L, layout.seq_len) if positions[j] - layout.block_starts[(positions[j]) // B] == r]
        counted = [(i, j) for i in range(b) for j in rows if diff_mask[i, j]]
        acc = sum(int(argmax[i, j] == targets[i, j]) for i, j in counted) / len(counted)
        assert got["draft_accuracy"][r] == pytest.approx(acc)
        agree = [(i, j) for i, j in counted if positions[j] >= 1 and ar_mask[i, positions[j] - 1]]
        rate = sum(int(argmax[i, j] == argmax[i, positions[j] - 1]) for i, j in agree) / len(agree)
        assert got["draft_agreement"][r] == pytest.approx(rate)
    # Accepted lengths of the two full blocks of each sample, when all their drafts count.
    accepted = []
    for i in range(b):
        for block in range(2):
            rows = list(layout.block_rows(block))
            if not all(diff_mask[i, j] and ar_mask[i, positions[j] - 1] for j in rows[1:]):
                continue
            a = 1
            while a < B and argmax[i, rows[a]] == argmax[i, positions[rows[a]] - 1]:
                a += 1
            accepted.append(a)
    assert got["est_tokens_per_pass"] == pytest.approx(sum(accepted) / len(accepted))
