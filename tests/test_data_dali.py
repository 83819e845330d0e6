"""The DALI loader yields the default loader's batches (skipped, with the reason, when DALI is absent)."""

import importlib.util

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from tidar_megatron.data.dataset import TiDARBatches, TokenIds, build_gpt_datasets
from tidar_megatron.layout import TiDARLayout

HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
EOD, VOCAB, MASK = 1, 300, 300
LAYOUT = TiDARLayout.for_training(16, 4)


def test_missing_dali_is_a_clear_error(monkeypatch):
    import sys

    from tidar_megatron.data import dali_loader
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r"pip install 'tidar_megatron\[dali\]'.*data.loader: megatron"):
        dali_loader.DaliTiDARBatches(None, 2, LAYOUT, MASK)


@pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install 'tidar_megatron[dali]')")
def test_dali_batches_equal_default_loader(tmp_path):
    from tidar_megatron.data.dali_loader import DaliTiDARBatches
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(tmp_path / "c.bin"), dtype=DType.optimal_dtype(VOCAB))
    for _ in range(200):
        doc = np.append(rng.integers(2, 290, rng.integers(5, 30)), EOD)
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(tmp_path / "c.idx"))
    train = build_gpt_datasets([str(tmp_path / "c")], "100,0,0", 16, 3, TokenIds(EOD, VOCAB), [64, None, None],
                               cache_dir=str(tmp_path / "cache"))[0]
    default = TiDARBatches(train, 2, LAYOUT, MASK, consumed_samples=6, dp_rank=1, dp_size=2)
    dali = DaliTiDARBatches(train, 2, LAYOUT, MASK, consumed_samples=6, dp_rank=1, dp_size=2, device="cpu")
    for _ in range(5):
        want, got = next(default), next(dali)
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert dali.state_dict() == default.state_dict() == {"consumed_samples": 26}
    rest_default, rest_dali = list(default), list(dali)  # both end after the last full batch
    assert len(rest_dali) == len(rest_default) > 0
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rest_dali, rest_default))
