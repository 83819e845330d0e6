"""Blends as Megatron-LM writes them: weights and prefixes on the command line, a blend file, per-split
blends; what each split holds and the epochs a run takes of each dataset, against a brute-force count of
the documents written; a weighted blend trained through `tidar-megatron train` with its weights in the log."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from tidar_megatron.config import ConfigError, load_config
from tidar_megatron.data import blend
from tidar_megatron.data.dataset import TokenIds, build_gpt_datasets

EOD, VOCAB, SEQ = 1, 500, 16


def write_corpus(prefix, num_docs, offset, seed) -> list[int]:
    """Documents of ids in [offset, offset+100) then EOD; returns their lengths."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(VOCAB))
    lengths = []
    for _ in range(num_docs):
        doc = np.append(rng.integers(offset, offset + 100, rng.integers(5, 40)), EOD)
        builder.add_document(doc, [len(doc)])
        lengths.append(len(doc))
    builder.finalize(f"{prefix}.idx")
    return lengths


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("blend")
    return {"a": (str(d / "a"), write_corpus(d / "a", 200, 100, 0)),
            "b": (str(d / "b"), write_corpus(d / "b", 120, 300, 1))}


def test_the_command_line_takes_a_blend_as_megatron_lm_writes_it():
    cfg = load_config("tiny", ["--data.blend", "0.7", "data/a", "0.3", "data/b", "--train.lr", "1e-3"])
    assert cfg.data.blend == ["0.7", "data/a", "0.3", "data/b"] and cfg.train.lr == 1e-3
    assert blend.resolve(cfg.data).whole == blend.Blend(["data/a", "data/b"], [0.7, 0.3])
    assert blend.resolve(load_config("tiny", ["--data.blend", "data/a", "data/b"]).data).whole.weights is None
    assert load_config("tiny", ["--data.blend", "[0.5, x, 0.5, y]"]).data.blend == ["0.5", "x", "0.5", "y"]


@pytest.mark.parametrize("items,message", [
    (["0.7", "data/a", "data/b"], "give weights and prefixes alternating"),
    (["data/a", "0.3", "data/b", "0.7"], "give weights and prefixes alternating"),
    (["-1", "data/a", "2", "data/b"], "weights must be positive numbers, got -1, 2"),
    (["0", "data/a"], "weights must be positive numbers"),
])
def test_a_malformed_blend_is_one_line(items, message):
    with pytest.raises(ConfigError, match=message) as err:
        blend.resolve(load_config("tiny", ["--data.blend", *items]).data)
    assert str(err.value).startswith("data.blend") and "\n" not in str(err.value)


def test_blend_files_and_per_split_blends(tmp_path):
    text = tmp_path / "blend.txt"
    text.write_text("# web and code\n0.7 data/web   # FineWeb\n0.3\ndata/code\n")
    assert blend.resolve(load_config("tiny", ["--data.blend_file", str(text)]).data).whole == \
        blend.Blend(["data/web", "data/code"], [0.7, 0.3])
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ["0.6", "a", "0.4", "b"], "valid": ["c"]}))
    resolved = blend.resolve(load_config("tiny", ["--data.blend_file", str(splits)]).data)
    assert resolved.whole is None and resolved.per_split == (blend.Blend(["a", "b"], [0.6, 0.4]),
                                                             blend.Blend(["c"], None), None)
    flags = blend.resolve(load_config("tiny", ["--data.train_blend", "2", "a", "1", "b", "--data.valid_blend", "c"]).data)
    assert flags.per_split == (blend.Blend(["a", "b"], [2.0, 1.0]), blend.Blend(["c"], None), None)
    assert flags.prefixes == ["a", "b", "c"]
    for overrides, message in [
        (["--data.blend", "a", "--data.blend_file", str(text)], "data.blend and data.blend_file are given"),
        (["--data.valid_blend", "c"], "need data.train_blend"),
        (["--data.blend_file", str(tmp_path / "none.txt")], r"none.txt: cannot read it \(No such file"),
        ([], "data.blend is empty"),
    ]:
        with pytest.raises(ConfigError, match=message):
            blend.resolve(load_config("tiny", overrides).data)
    splits.write_text('{"training": ["a"]}')
    with pytest.raises(ConfigError, match="expected the keys train \\(required\\), valid, test; got training"):
        blend.resolve(load_config("tiny", ["--data.blend_file", str(splits)]).data)


def test_split_contents_and_epochs_against_a_brute_force_count(corpora):
    (a, len_a), (b, len_b) = corpora["a"], corpora["b"]
    blends = blend.resolve(load_config("tiny", ["--data.blend", "3", a, "1", b]).data)
    parts = blend.contents(blends, "90,5,5")
    # Megatron cuts each prefix's documents at round(fraction x documents).
    for name, lengths, (lo, hi) in [(a, len_a, (0, 180)), (b, len_b, (0, 108))]:
        part = next(p for p in parts[0] if p.prefix == name)
        assert (part.documents, part.tokens) == (hi - lo, sum(lengths[lo:hi]))
    assert [p.weight for p in parts[0]] == [0.75, 0.25]
    assert parts[1][0].tokens == sum(len_a[180:190]) and parts[2][1].documents == 6
    lines = blend.describe(parts, [400, 40, 0], SEQ)
    epochs_a = math.ceil(0.75 * 400) * SEQ / sum(len_a[:180])
    assert lines[0] == "data: 400 training samples of 16 tokens from 2 dataset(s)"
    assert lines[1] == f"data: weight 0.750  180 documents  {sum(len_a[:180]):,} tokens  {epochs_a:.3g} epochs  {a}"
    assert lines[3] == f"data: valid: 16 documents, {sum(len_a[180:190]) + sum(len_b[108:114]):,} tokens from 2 dataset(s)"


def test_per_split_blends_draw_each_split_from_its_own_data(corpora, tmp_path):
    (a, _), (b, _) = corpora["a"], corpora["b"]
    blends = blend.resolve(load_config("tiny", ["--data.train_blend", a, "--data.valid_blend", b]).data)
    train, valid, test = build_gpt_datasets(blends, None, SEQ, 1, TokenIds(EOD, VOCAB), [50, 10, 0],
                                            cache_dir=str(tmp_path))
    train_ids = torch.stack([train[i]["tokens"] for i in range(len(train))])
    valid_ids = torch.stack([valid[i]["tokens"] for i in range(len(valid))])
    assert ((train_ids == EOD) | ((train_ids >= 100) & (train_ids < 200))).all()  # all from a
    assert ((valid_ids == EOD) | ((valid_ids >= 300) & (valid_ids < 400))).all()  # all from b
    assert test is None and len(train) >= 50 and len(valid) >= 10


def test_an_unweighted_blend_too_short_for_the_run_is_refused(corpora):
    """Megatron takes one epoch of each prefix of an unweighted blend: the run would end early."""
    (a, _), (b, _) = corpora["a"], corpora["b"]
    blends = blend.resolve(load_config("tiny", ["--data.blend", a, b]).data)
    blend.check(blends, "100,0,0", [100, 0, 0], SEQ)
    with pytest.raises(ConfigError, match=r"data.blend: without weights the train split is one epoch of each prefix, "
                                          r"[\d,]+ samples of 16 tokens, but the run needs 10,000; give weights"):
        blend.check(blends, "100,0,0", [10_000, 0, 0], SEQ)


@pytest.mark.slow
def test_a_weighted_blend_on_the_command_line_trains_and_logs_its_weights(corpus, tmp_path):
    """`--data.blend 0.7 <jsonl-made prefix> 0.3 <parquet-made prefix>` through `tidar-megatron train`."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    from tidar_megatron.data.tokenize_corpus import tokenize_corpus

    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 8 for i in range(40)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "code.parquet", row_group_size=10)
    tokenize_corpus([str(tmp_path / "code.parquet")], str(tmp_path / "code"), corpus["tokenizer"], workers=1,
                    progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "tidar_megatron", "train", "--config", "tiny",
         "--data.blend", "0.7", corpus["prefix"], "0.3", str(tmp_path / "code"), "--data.tokenizer",
         corpus["tokenizer"], "--data.split", "100,0,0", "--train.seq_length", "32", "--train.train_steps", "2",
         "--train.lr_warmup_steps", "0", "--train.eval_interval", "0", "--checkpoint.dir", str(tmp_path / "run"),
         "--log.wandb_mode", "disabled"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data_lines = [line for line in proc.stderr.splitlines() if line.startswith("data: ")]
    assert data_lines[0] == "data: 16 training samples of 32 tokens from 2 dataset(s)"
    assert data_lines[1].startswith("data: weight 0.700  5 documents  ") and data_lines[1].endswith(corpus["prefix"])
    assert data_lines[2].startswith("data: weight 0.300  40 documents  ") and data_lines[2].endswith(str(tmp_path / "code"))
    assert "step 2/2 loss" in proc.stderr and (tmp_path / "run" / "iter_0000002").is_dir()
    assert data_lines == [line for line in (tmp_path / "run" / "train.log").read_text().splitlines()
                          if line.startswith("data: ")]  # the run's log keeps them
