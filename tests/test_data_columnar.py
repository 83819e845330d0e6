"""Parquet, Arrow and `datasets.save_to_disk` inputs: the same .bin/.idx as the JSONL export of the same
rows (written by `datasets` itself), chunks cut at row groups, bad rows named by row, one-line errors."""

import filecmp
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tidar_megatron.data import columnar
from tidar_megatron.data.chunks import Chunk
from tidar_megatron.data.corpus import find_inputs
from tidar_megatron.data.tokenize_corpus import main, tokenize_corpus
from tidar_megatron.data.tokenizer import train_sentencepiece

pa = pytest.importorskip("pyarrow")  # after columnar: pyarrow without its threads, as the tokenizer uses it
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("datasets")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Written by datasets in a process of its own: its Arrow thread pools would otherwise live in this one when
# the tokenizer forks its workers.
EXPORT = """
import datasets, pyarrow as pa, sys
root, texts = sys.argv[1], [t or (None if i == 17 else "") for i, t in enumerate(open(sys.argv[2]).read().split("\\0"))]
ds = datasets.Dataset.from_dict({"content": texts, "id": list(range(len(texts)))})
ds.to_json(f"{root}/rows.jsonl")
ds.to_parquet(f"{root}/rows.parquet", batch_size=7)
ds.save_to_disk(f"{root}/saved", num_shards=3)
with pa.ipc.new_file(f"{root}/rows.arrow", ds.data.table.schema) as writer:
    writer.write_table(ds.data.table, max_chunksize=9)
datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(f"{root}/dd")
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Source files as rows of a `datasets.Dataset` (row 5 empty, row 17 null), exported by datasets to
    JSONL, Parquet (row groups of 7 rows), save_to_disk (3 shards) and a DatasetDict, and by pyarrow to an
    Arrow IPC file (record batches of 9 rows)."""
    root = tmp_path_factory.mktemp("columnar")
    texts = [p.read_text(encoding="utf-8") for p in sorted((STDLIB / "email").rglob("*.py")) if p.stat().st_size]
    texts[5] = texts[17] = ""
    model = train_sentencepiece([t for t in texts if t], str(root / "sp.model"), vocab_size=400)
    (root / "texts").write_text("\0".join(texts))
    subprocess.run([sys.executable, "-c", EXPORT, str(root), str(root / "texts")], check=True, capture_output=True)
    return root, model


def test_every_columnar_form_gives_the_ids_of_the_jsonl_export(corpus):
    root, model = corpus
    jsonl = tokenize_corpus([str(root / "rows.jsonl")], str(root / "from_jsonl"), model, text_key="content",
                            workers=2, progress=False)
    outs = {name: tokenize_corpus([str(given)], str(root / name), model, text_key="content", workers=2,
                                  chunk_mb=0.004, progress=False)  # ~4 KB: a chunk per row group / batch / file
            for name, given in [("parquet", root / "rows.parquet"), ("saved", root / "saved"),
                                ("arrow", root / "rows.arrow")]}
    rows = pq.read_metadata(root / "rows.parquet").num_rows  # read here, after the forks (pyarrow's threads)
    assert jsonl["docs"] == rows - 2 and [(d.line, d.reason) for d in jsonl["skipped"]] == \
        [(6, "empty document"), (18, "key 'content' holds NoneType, not a string")]
    saved = find_inputs([str(root / "saved")])
    shard_rows = [len(list(columnar.read(Chunk((f,)), "content"))) for f in saved]
    for name, out in outs.items():
        assert out["docs"] == rows - 2 and out["shards"] >= 3, name
        for ext in (".bin", ".idx"):
            assert filecmp.cmp(root / f"from_jsonl{ext}", root / f"{name}{ext}", shallow=False), (name, ext)
        files, sizes = (saved, shard_rows) if name == "saved" else ([str(root / f"rows.{name}")], [rows])
        expected = [(*_file_and_row(files, sizes, 5), "empty document"),
                    (*_file_and_row(files, sizes, 17), "'content' is null")]
        skipped = json.loads((root / f"{name}.meta.json").read_text())["skipped"]["documents"]
        assert [(d["file"], d["row"], d["reason"]) for d in skipped] == expected, name
    arrow = root / "rows.arrow"
    assert [d.location for d in outs["arrow"]["skipped"]] == [f"{arrow} row 5", f"{arrow} row 17"]


def _file_and_row(files, sizes, row):
    for f, n in zip(files, sizes):
        if row < n:
            return f, row
        row -= n


def test_a_parquet_file_is_cut_at_its_row_groups(corpus):
    root, _ = corpus
    chunks = columnar.plan(str(root / "rows.parquet"), 1, "content")
    groups = pq.read_metadata(root / "rows.parquet").num_row_groups
    assert groups > 3 and [(c.start, c.end) for c in chunks] == [(i, i + 1) for i in range(groups)]
    whole = columnar.plan(str(root / "rows.parquet"), 1 << 30, "content")
    assert [(c.start, c.end) for c in whole] == [(0, groups)]
    rows = [doc for chunk in chunks for _, doc in columnar.read(chunk, "content")]
    exported = [json.loads(line)["content"] for line in (root / "rows.jsonl").read_text().splitlines()]
    assert [r if isinstance(r, str) else None for r in rows] == [t or None for t in exported]


def test_invalid_utf8_in_a_column_is_a_bad_row(tmp_path, corpus):
    _, model = corpus
    raw = pa.array([b"fine", b"caf\xe9", b"also fine"], pa.binary()).view(pa.string())  # Arrow does not check
    pq.write_table(pa.table({"text": raw}), tmp_path / "t.parquet")
    out = tokenize_corpus([str(tmp_path / "t.parquet")], str(tmp_path / "o"), model, workers=1, progress=False)
    assert out["docs"] == 2 and [(d.line, d.reason) for d in out["skipped"]] == [(1, "invalid UTF-8 at byte 3")]


def test_a_dataset_directory_takes_only_its_tables(tmp_path, corpus):
    root, _ = corpus
    repo = tmp_path / "fineweb"
    (repo / "data" / "CC-MAIN-1").mkdir(parents=True)
    (repo / "README.md").write_text("# a dataset card, not a document\n")
    for i in (2, 1):
        (repo / "data" / "CC-MAIN-1" / f"00{i}.parquet").write_bytes((root / "rows.parquet").read_bytes())
    assert find_inputs([str(repo)]) == [str(repo / "data" / "CC-MAIN-1" / f"00{i}.parquet") for i in (1, 2)]
    saved = root / "saved"
    assert find_inputs([str(saved)]) == [str(saved / f"data-0000{i}-of-00003.arrow") for i in range(3)]


def test_columnar_mistakes_are_one_line_errors(tmp_path, corpus, capsys):
    root, model = corpus
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    (tmp_path / "torn.parquet").write_bytes((root / "rows.parquet").read_bytes()[:-100])
    cases = [
        ([str(root / "rows.parquet")], "no column 'text' (columns: content, id); name the text column with --text-key"),
        ([str(root / "dd")], f"a datasets DatasetDict with splits train, test; give one split's directory, "
                             f"e.g. --input {root / 'dd' / 'train'}"),
        ([str(tmp_path / "ints.parquet")], "column 'text' holds int64, not text"),
        ([str(tmp_path / "torn.parquet")], "torn.parquet: not a readable Parquet file"),
        ([str(root / "rows.parquet"), "--json-keys", "content", "id"], "one output per key needs Megatron-LM's naming"),
    ]
    for inputs, message in cases:
        assert main(["--input", *inputs, "--output-prefix", str(tmp_path / "o"), "--tokenizer", model,
                     "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tidar-megatron tokenize: error: ") and message in err and err.count("\n") == 1, err
    # One key without Megatron-LM's naming is the text key.
    assert main(["--input", str(root / "rows.parquet"), "--json-keys", "content", "--output-prefix",
                 str(tmp_path / "o"), "--tokenizer", model, "--workers", "1", "--quiet"]) == 0
    assert json.loads((tmp_path / "o.meta.json").read_text())["text_key"] == "content"
