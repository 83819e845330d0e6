"""The layout module against a brute-force construction written from the rule in words."""

import itertools

import pytest
import torch

from tidar_megatron.layout import TILE_FULL, TILE_PARTIAL, TILE_SKIP, TiDARLayout

SIZES = [(L, B) for L in (1, 2, 5, 8, 12, 17, 32) for B in (1, 2, 3, 4, 8, 16) ]


def brute_force_training(L, B):
    """Dense keep-mask, positions and diffusion target positions, pair by pair from the definition."""
    S = 2 * L
    pos, kind, block = [], [], []
    for i in range(L):
        pos.append(i), kind.append("clean"), block.append(None)
    for p in range(L):
        pos.append(p), kind.append("mask"), block.append(p // B)
    keep = torch.zeros(S, S, dtype=torch.bool)
    for q, k in itertools.product(range(S), range(S)):
        if kind[q] == "clean":
            keep[q, k] = kind[k] == "clean" and pos[k] <= pos[q]
        else:
            start = block[q] * B
            keep[q, k] = (kind[k] == "clean" and pos[k] < start) or (kind[k] == "mask" and block[k] == block[q])
    return keep, torch.tensor(pos)


@pytest.mark.parametrize("L,B", SIZES)
def test_training_mask_and_positions_match_brute_force(L, B):
    layout = TiDARLayout.for_training(L, B)
    keep, pos = brute_force_training(L, B)
    assert layout.seq_len == 2 * L
    assert torch.equal(layout.dense_mask(), keep)
    assert torch.equal(layout.megatron_mask()[0, 0], ~keep)
    assert torch.equal(layout.position_ids, pos)
    mm = layout.mask_mod()
    q, k = torch.meshgrid(torch.arange(2 * L), torch.arange(2 * L), indexing="ij")
    assert torch.equal(mm(0, 0, q, k), keep)


@pytest.mark.parametrize("prefix,B", [(0, 1), (0, 4), (3, 4), (10, 3), (7, 8)])
def test_decoding_layout_matches_rule(prefix, B):
    """Pending block [prefix, prefix+B) is causal over cache+itself; the block for acceptance a sees the
    cache and the first a pending tokens, plus itself."""
    layout = TiDARLayout.for_decoding(prefix, B)
    C = prefix + B
    assert layout.seq_len == C + B * B
    keep = layout.dense_mask()
    for q in range(C):
        assert keep[q, : q + 1].all() and not keep[q, q + 1:].any()
    for a in range(1, B + 1):
        rows = slice(C + (a - 1) * B, C + a * B)
        expect = torch.zeros(layout.seq_len, dtype=torch.bool)
        expect[: prefix + a] = True
        expect[rows] = True
        assert (keep[rows] == expect).all()
        assert torch.equal(layout.position_ids[rows], torch.arange(prefix + a, prefix + a + B))


@pytest.mark.parametrize("L,B", [(5, 2), (12, 4), (17, 3), (32, 8)])
@pytest.mark.parametrize("tile_q,tile_k", [(1, 1), (4, 4), (16, 16), (16, 8), (3, 5)])
def test_tile_classes_match_brute_force(L, B, tile_q, tile_k):
    for layout in (TiDARLayout.for_training(L, B), TiDARLayout.for_decoding(L, B)):
        keep = layout.dense_mask()
        S = layout.seq_len
        got = layout.tile_classes(tile_q, tile_k)
        for i, j in itertools.product(range(got.shape[0]), range(got.shape[1])):
            tile = keep[i * tile_q:(i + 1) * tile_q, j * tile_k:(j + 1) * tile_k]
            expect = TILE_FULL if tile.all() else TILE_SKIP if not tile.any() else TILE_PARTIAL
            assert got[i, j] == expect, (i, j, S)


def test_training_targets():
    L, B = 6, 4
    layout = TiDARLayout.for_training(L, B)
    tokens = torch.arange(10, 10 + L)[None]
    labels = torch.arange(11, 11 + L)[None]
    loss_mask = torch.tensor([[1.0, 1, 0, 1, 1, 1]])
    targets, ar, diff = layout.training_targets(tokens, labels, loss_mask)
    assert targets.tolist() == [[11, 12, 13, 14, 15, 16, 10, 11, 12, 13, 14, 15]]
    assert ar.tolist() == [[1, 1, 0, 1, 1, 1] + [0] * 6]
    # The diffusion target tokens[p] == labels[p-1]: it counts exactly when that AR label counts.
    assert diff.tolist() == [[0] * 6 + [1, 1, 1, 0, 1, 1]]
    inputs = layout.training_inputs(tokens, mask_token_id=99)
    assert inputs.tolist() == [list(range(10, 16)) + [99] * 6]


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match="clean_len"):
        TiDARLayout.for_training(0, 4)
    with pytest.raises(ValueError, match="clean tokens"):
        TiDARLayout.for_training(8, 4).training_inputs(torch.zeros(1, 7, dtype=torch.long), 0)


# --- packed documents (reset_attention_mask / reset_position_ids) ---------------------------------------
DOCUMENT_CASES = [  # (L, B, document starts per sample): cuts inside blocks, documents shorter than a block
    (8, 4, [(5,), (), (1, 2, 7)]), (12, 4, [(4, 8), (3,), (11,)]), (10, 3, [(1,), (2, 3, 4, 5), (6,)]),
    (17, 8, [(3, 9, 10), (16,)]), (5, 16, [(2,)]), (9, 1, [(4, 5), (8,)]),
]


def brute_force_documents(L, B, starts):
    """Per sample: the keep-mask and the positions of the doubled sequence, from the rule in words."""
    S = 2 * L
    keeps, positions = [], []
    for cuts in starts:
        bounds = [0, *cuts]
        doc = [max(i for i, b in enumerate(bounds) if b <= p) for p in range(L)]
        first = [bounds[d] for d in doc]
        index = list(range(L)) + list(range(L))
        kind = ["clean"] * L + ["mask"] * L
        keep = torch.zeros(S, S, dtype=torch.bool)
        for q, k in itertools.product(range(S), range(S)):
            same_doc = doc[index[q]] == doc[index[k]]
            if kind[q] == "clean":
                keep[q, k] = kind[k] == "clean" and index[k] <= index[q] and same_doc
            else:
                start = index[q] // B * B
                own_block = kind[k] == "mask" and index[k] // B == index[q] // B
                keep[q, k] = same_doc and ((kind[k] == "clean" and index[k] < start) or own_block)
        keeps.append(keep)
        positions.append(torch.tensor([index[r] - first[index[r]] for r in range(S)]))
    return torch.stack(keeps), torch.stack(positions)


@pytest.mark.parametrize("L,B,starts", DOCUMENT_CASES)
def test_document_masks_and_positions_match_brute_force(L, B, starts):
    layout = TiDARLayout.for_training(L, B).with_documents(starts)
    keep, positions = brute_force_documents(L, B, starts)
    assert torch.equal(layout.dense_mask(), keep)
    assert torch.equal(layout.megatron_mask()[:, 0], ~keep)
    assert torch.equal(layout.position_ids, positions)
    q, k = torch.meshgrid(torch.arange(2 * L), torch.arange(2 * L), indexing="ij")
    for b in range(len(starts)):
        assert torch.equal(layout.mask_mod()(b, 0, q, k), keep[b])
    for tile_q, tile_k in ((1, 1), (4, 4), (3, 5), (8, 16)):
        got = layout.tile_classes(tile_q, tile_k)
        for i, j in itertools.product(range(got.shape[0]), range(got.shape[1])):
            tile = keep[:, i * tile_q:(i + 1) * tile_q, j * tile_k:(j + 1) * tile_k]
            expect = TILE_FULL if tile.all() else TILE_SKIP if not tile.any() else TILE_PARTIAL
            assert got[i, j] == expect, (tile_q, tile_k, i, j)
    assert TiDARLayout.from_tensor(layout.to_tensor()) == layout
    # Positions only (reset_position_ids without reset_attention_mask): the shared mask, reset positions.
    positions_only = TiDARLayout.for_training(L, B).with_documents(starts, attention=False)
    assert torch.equal(positions_only.dense_mask(), TiDARLayout.for_training(L, B).dense_mask().expand_as(keep))
    assert torch.equal(positions_only.position_ids, positions)



def test_documents_are_for_training_layouts_only():
    with pytest.raises(ValueError, match="training layouts"):
        TiDARLayout.for_decoding(8, 4).with_documents([(3,)])
    with pytest.raises(ValueError, match="training layouts"):
        TiDARLayout.for_prefill(8, 4).with_documents([(3,)])

def test_documents_come_from_end_of_document_tokens():
    from tidar_megatron.data.batch import PackedDocuments, from_token_windows

    EOD = 2
    windows = torch.tensor([[5, 6, EOD, 7, 8, EOD, 9, 4, 3], [5, 6, 7, 8, 9, 4, 3, 1, EOD]])
    batch = from_token_windows(TiDARLayout.for_training(8, 4), windows, 99, PackedDocuments(EOD))
    assert batch["layout"].documents == ((3, 6), ())  # the last token's EOD starts nothing in this window
    assert torch.equal(batch["position_ids"], batch["layout"].position_ids)
    assert batch["position_ids"][0, :8].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
