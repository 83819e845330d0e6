"""Tile classes and the kernels' visit lists against a brute-force classification of the dense mask."""

import pytest
import torch
from tidar_kernels.tidar_attention import skipped_tile_fraction
from tidar_kernels.tile_tables import tile_tables

from tidar_megatron.layout import TILE_FULL, TILE_PARTIAL, TILE_SKIP, TiDARLayout


def brute_force_classes(layout, tile_q, tile_k):
    """Classify every tile of `layout.dense_mask()` by looking at all its in-range elements."""
    mask = layout.dense_mask()
    rows, cols = mask.shape
    classes = torch.empty(-(-rows // tile_q), -(-cols // tile_k), dtype=torch.int8)
    for i in range(classes.shape[0]):
        for j in range(classes.shape[1]):
            tile = mask[i * tile_q:(i + 1) * tile_q, j * tile_k:(j + 1) * tile_k]
            classes[i, j] = TILE_FULL if tile.all() else TILE_SKIP if not tile.any() else TILE_PARTIAL
    return classes


LAYOUTS = ([TiDARLayout.for_training(c, b) for c in (1, 5, 16, 21, 24, 33) for b in (1, 2, 4, 7, 16)]
           + [TiDARLayout.for_decoding(p, b) for p in (0, 3, 20) for b in (1, 4, 5)])
TILES = [(4, 4), (8, 16), (16, 16), (16, 8), (5, 3), (32, 16)]


@pytest.mark.parametrize("tile_q,tile_k", TILES)
def test_tile_classes_match_brute_force(tile_q, tile_k):
    for layout in LAYOUTS:
        expected = brute_force_classes(layout, tile_q, tile_k)
        assert torch.equal(layout.tile_classes(tile_q, tile_k), expected), layout


@pytest.mark.parametrize("tile_q,tile_k", TILES)
def test_tile_classes_from_a_first_row_skip_only_the_tiles_before_it(tile_q, tile_k):
    """A decoding step queries rows [prefix, seq_len): the query tiles holding them keep their brute-force
    class, the tiles wholly before the prefix are SKIP."""
    for layout in LAYOUTS:
        expected = brute_force_classes(layout, tile_q, tile_k)
        for first_row in sorted({0, 1, tile_q, layout.seq_len // 2, layout.seq_len - 1} & set(range(layout.seq_len))):
            first_tile = first_row // tile_q
            got = layout.tile_classes(tile_q, tile_k, first_row)
            assert torch.equal(got[first_tile:], expected[first_tile:]), (layout, first_row)
            assert (got[:first_tile] == TILE_SKIP).all(), (layout, first_row)


@pytest.mark.parametrize("tile_q,tile_k", TILES)
def test_visit_lists_list_exactly_the_visible_tiles(tile_q, tile_k):
    for layout in LAYOUTS:
        expected = brute_force_classes(layout, tile_q, tile_k)
        if layout.seq_len % tile_k:  # a ragged last key tile is bounds-checked, hence never FULL
            expected[:, -1][expected[:, -1] == TILE_FULL] = TILE_PARTIAL
        tables = tile_tables(layout, tile_q, tile_k, torch.device("cpu"))
        for visits, classes in ((tables.keys_of_query_tile, expected), (tables.queries_of_key_tile, expected.t())):
            for owner in range(classes.shape[0]):
                count = visits.count[owner].item()
                listed = visits.index[owner, :count].long()
                assert torch.equal(listed, torch.nonzero(classes[owner] != TILE_SKIP).flatten())
                assert torch.equal(visits.tile_class[owner, :count], classes[owner, listed])


def test_skipped_tile_fraction_of_the_training_layout():
    layout = TiDARLayout.for_training(256, 16)
    classes = brute_force_classes(layout, 16, 16)
    assert skipped_tile_fraction(layout, 16, 16) == pytest.approx((classes == TILE_SKIP).float().mean().item())
    # The clean half is causal, each mask block sees a clean prefix and itself: about 3/4 of tiles are empty.
    assert 0.70 < skipped_tile_fraction(layout, 16, 16) < 0.76
