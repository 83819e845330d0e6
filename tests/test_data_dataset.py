"""TiDAR batches from megatron-core datasets: layout construction, determinism, blends, resume, DP/TP."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from tidar_megatron.data.batch import from_gpt_batch
from tidar_megatron.data.dataset import TiDARBatches, TokenIds, build_gpt_datasets
from tidar_megatron.layout import TiDARLayout

EOD, VOCAB, MASK = 1, 500, 500
SEQ, BLOCK = 16, 4
LAYOUT = TiDARLayout.for_training(SEQ, BLOCK)


def write_corpus(prefix, num_docs, offset, seed):
    """Documents of random ids in [offset, offset+100) then EOD, so every token says which corpus it is from."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(VOCAB))
    for _ in range(num_docs):
        doc = np.append(rng.integers(offset, offset + 100, rng.integers(5, 40)), EOD)
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    return write_corpus(d / "a", 300, 100, 0), write_corpus(d / "b", 300, 300, 1)


def build(corpora, tmp_path, seed=1234, blend=None, cache="cache"):
    blend = blend or ["1", corpora[0], "3", corpora[1]]
    return build_gpt_datasets(blend, "90,5,5", SEQ, seed, TokenIds(EOD, VOCAB), [200, 20, 20],
                              cache_dir=str(tmp_path / cache))


def samples(ds, n=None):
    return torch.stack([ds[i]["tokens"] for i in range(n or len(ds))])


def test_tidar_batch_is_the_layout_construction(corpora, tmp_path):
    train = build(corpora, tmp_path)[0]
    clean = torch.utils.data.default_collate([train[i] for i in range(3)])
    clean["loss_mask"][1, 5] = 0  # a masked AR label must also mask the diffusion target it equals
    batch = from_gpt_batch(TiDARLayout.for_training(SEQ, BLOCK), clean, MASK)

    tokens, labels, loss_mask = clean["tokens"], clean["labels"], clean["loss_mask"]
    # Independent reference: L clean tokens then L masks at the same positions; the AR half predicts the
    # next token, a mask at position p predicts tokens[p] (== labels[p-1]).
    assert torch.equal(batch["input_ids"], torch.cat([tokens, torch.full_like(tokens, MASK)], 1))
    assert torch.equal(batch["position_ids"], torch.arange(SEQ).repeat(2))
    assert torch.equal(batch["targets"], torch.cat([labels, tokens], 1))
    assert torch.equal(batch["ar_mask"], torch.cat([loss_mask, torch.zeros_like(loss_mask)], 1))
    diff = torch.cat([torch.ones(3, 1), loss_mask[:, :-1]], 1)
    assert torch.equal(batch["diff_mask"], torch.cat([torch.zeros_like(loss_mask), diff], 1))
    assert batch["diff_mask"][1, SEQ + 6] == 0
    # ... and exactly what the layout module builds.
    layout = TiDARLayout.for_training(SEQ, BLOCK)
    targets, ar, dm = layout.training_targets(tokens, labels, loss_mask)
    assert torch.equal(batch["input_ids"], layout.training_inputs(tokens, MASK))
    assert torch.equal(batch["targets"], targets) and torch.equal(batch["ar_mask"], ar)
    assert torch.equal(batch["diff_mask"], dm)
    assert torch.equal(batch["position_ids"], layout.position_ids)


def test_labels_are_next_tokens_with_eod_between_documents(corpora, tmp_path):
    train = build(corpora, tmp_path)[0]
    s = train[0]
    assert torch.equal(s["labels"][:-1], s["tokens"][1:])
    assert "attention_mask" not in s  # create_attention_mask=False: TiDAR's mask comes from the layout
    assert (samples(train) == EOD).any()  # documents are packed with EOD separators


def test_splits_and_blends_are_deterministic_by_seed(corpora, tmp_path):
    first = build(corpora, tmp_path, cache="c1")
    second = build(corpora, tmp_path, cache="c2")  # no shared cache: rebuilt from scratch
    for a, b in zip(first, second):
        assert len(a) == len(b) and torch.equal(samples(a), samples(b))
    other = build(corpora, tmp_path, seed=7, cache="c3")
    assert not torch.equal(samples(first[0]), samples(other[0]))
    # Weights 1:3 -> about a quarter of the training samples from corpus a (ids 100..199).
    tokens = samples(first[0])
    from_a = ((tokens >= 100) & (tokens < 200)).sum().item() / (tokens != EOD).sum().item()
    assert 0.15 < from_a < 0.35
    # The splits use disjoint documents: a validation sample never occurs in training.
    train_rows = {tuple(r.tolist()) for r in samples(first[0])}
    assert not train_rows & {tuple(r.tolist()) for r in samples(first[1])}


def test_resume_continues_on_the_next_unseen_sample(corpora, tmp_path):
    train = build(corpora, tmp_path)[0]
    run = TiDARBatches(train, micro_batch_size=2, layout=LAYOUT, mask_token_id=MASK)
    uninterrupted = [next(run) for _ in range(5)]
    early = TiDARBatches(train, 2, LAYOUT, MASK)
    for _ in range(2):
        next(early)
    state = early.state_dict()
    assert state == {"consumed_samples": 4}
    resumed = TiDARBatches(train, 2, LAYOUT, MASK, num_workers=1)  # prefetching must not move the position
    resumed.load_state_dict(state)
    for want in uninterrupted[2:]:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed.state_dict() == {"consumed_samples": 10}


def test_data_parallel_slices_and_tensor_parallel_copies(corpora, tmp_path):
    train = build(corpora, tmp_path)[0]
    whole = next(TiDARBatches(train, 4, LAYOUT, MASK))
    rank0 = next(TiDARBatches(train, 2, LAYOUT, MASK, dp_rank=0, dp_size=2))
    rank1 = next(TiDARBatches(train, 2, LAYOUT, MASK, dp_rank=1, dp_size=2))
    assert torch.equal(torch.cat([rank0["input_ids"], rank1["input_ids"]]), whole["input_ids"])
    # Two TP ranks of data-parallel rank 1 build their batches independently and get the same one.
    tp_peer = next(TiDARBatches(train, 2, LAYOUT, MASK, dp_rank=1, dp_size=2))
    assert all(torch.equal(tp_peer[k], rank1[k]) for k in rank1)


def test_missing_data_prefix_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin/.idx not found; create them with `tidar-megatron tokenize`"):
        build_gpt_datasets([str(tmp_path / "nope")], "100,0,0", SEQ, 1, TokenIds(EOD, VOCAB), [10, 0, 0])
