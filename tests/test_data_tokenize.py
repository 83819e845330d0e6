"""Corpus tokenization: byte-exact round trip through Megatron's IndexedDataset, kill-and-resume, bad input."""

import gzip
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from tidar_megatron.data.corpus import InputError
from tidar_megatron.data.tokenize_corpus import main, tokenize_corpus
from tidar_megatron.data.tokenizer import Tokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
AWKWARD = ["\tTabs\tand trailing spaces   \n\n\n  blank lines above\n",
           "Unicode ünïcødé 漢字 🙂 e\u0301 ﬁ\r\nCRLF", "meta\u2581space", "no newline at end"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    texts = [p.read_text(encoding="utf-8") for p in sorted((STDLIB / "json").glob("*.py"))]
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("tok") / "sp.model"), vocab_size=600)


def read_back(prefix, tok):
    """Documents of <prefix>.bin/.idx decoded, checking one EOD at the end of each and nowhere else."""
    ds = IndexedDataset(str(prefix))
    assert len(ds.document_indices) - 1 == len(ds)  # one sequence per document
    docs = []
    for i in range(len(ds)):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod_id and tok.eod_id not in ids[:-1]
        docs.append(tok.decode(ids[:-1]))
    return docs


def write_jsonl(path, texts, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "meta": 1}) + "\n")


def test_round_trip_source_tree_text_and_jsonl(tmp_path, sp_model):
    src = STDLIB / "email"
    all_sources = sorted(src.rglob("*.py"), key=str)
    sources = [p for p in all_sources if p.stat().st_size]  # empty files are left out, not errors
    texts = [p.read_text(encoding="utf-8") for p in sources]
    (tmp_path / "awkward.txt").write_text(AWKWARD[0], encoding="utf-8", newline="")
    many = [t for t in texts[:12]] + AWKWARD  # > chunk size, so the file is cut at line starts
    write_jsonl(tmp_path / "docs.jsonl", many)
    write_jsonl(tmp_path / "docs.jsonl.gz", AWKWARD, gzip.open)
    inputs = [str(src), str(tmp_path / "awkward.txt"), str(tmp_path / "docs.jsonl"), str(tmp_path / "docs.jsonl.gz")]
    expected = texts + [AWKWARD[0]] + many + AWKWARD
    zstd = _maybe_zstd(tmp_path)  # optional dependency: covered when installed
    if zstd:
        inputs.append(zstd)
        expected += AWKWARD
    out = tmp_path / "out" / "corpus"
    summary = tokenize_corpus(inputs, str(out), sp_model, glob="**/*.py", workers=2, chunk_mb=0.05,
                              progress=False)
    assert summary["shards"] > 4 and summary["error_count"] == 0
    assert summary["empty_files"] == len(all_sources) - len(sources)  # left out, not errors
    got = read_back(out, Tokenizer(sp_model))
    assert len(got) == len(expected) == summary["docs"]
    for g, e in zip(got, expected):
        assert g.encode("utf-8") == e.encode("utf-8")
    assert not (tmp_path / "out" / "corpus.shards").exists()  # merged and cleaned up
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus.bin", "corpus.idx", "corpus.meta.json"]


def _maybe_zstd(tmp_path):
    try:
        import zstandard
    except ImportError:
        return None
    path = tmp_path / "docs.jsonl.zst"
    raw = "".join(json.dumps({"text": t}) + "\n" for t in AWKWARD).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    return str(path)


def test_zstd_without_zstandard_is_a_clear_error(tmp_path, sp_model, monkeypatch):
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail
    with pytest.raises(InputError, match=r"a\.jsonl\.zst: zstd input needs the 'zstandard' package"):
        tokenize_corpus([str(tmp_path / "a.jsonl.zst")], str(tmp_path / "o"), sp_model, workers=1,
                        progress=False)


def bad_corpus(tmp_path):
    """300 good lines, then the five kinds of bad document at lines 301..305, then a good one."""
    good = [json.dumps({"text": f"document {i}\n\tbody"}) for i in range(300)]
    lines = [s.encode() for s in good] + [
        b'{"text": "unterminated',           # 301 malformed JSON
        b'{"content": "wrong key"}',         # 302 missing key
        b'{"text": "bad \xff byte"}',        # 303 invalid UTF-8
        b'{"text": ""}',                     # 304 empty document
        b'{"text": 17}',                     # 305 not a string
        json.dumps({"text": "last"}).encode()]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    binary = tmp_path / "tree" / "latin1.py"
    binary.parent.mkdir()
    binary.write_bytes(b"# ok\n# ok\nname = 'caf\xe9'\n")  # invalid UTF-8 on line 3
    return path, binary


BAD = [(301, "malformed JSON"), (302, "missing key 'text'"), (303, "invalid UTF-8"), (304, "empty document"),
       (305, "key 'text' holds int, not a string")]


def test_bad_input_is_reported_with_file_and_line_and_skipped(tmp_path, sp_model, capsys):
    """The summary names the first few bad documents (file:line and why); the sidecar lists them all."""
    path, binary = bad_corpus(tmp_path)
    summary = tokenize_corpus([str(path), str(binary.parent)], str(tmp_path / "out"), sp_model, workers=2,
                              chunk_mb=0.004, progress=True, max_errors_shown=3)  # ~4 KB chunks: errors in a late one
    err = capsys.readouterr().err
    assert summary["shards"] > 3 and summary["error_count"] == 6 and summary["docs"] == 301
    listed = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(listed) == 3 and all(got.startswith(f"skipped {path}:{line}: {reason}")
                                    for got, (line, reason) in zip(listed, BAD))
    assert f"... and 3 more: all are listed in {tmp_path / 'out'}.meta.json" in err
    assert "skipped 6 bad documents" in err
    assert "301 docs |" in err and " tok/s | " in err and " MB/s | " in err and "ETA" in err  # progress line
    assert read_back(tmp_path / "out", Tokenizer(sp_model))[-1] == "last"
    record = json.loads((tmp_path / "out.meta.json").read_text())["skipped"]
    assert record["count"] == 6 and [(d["file"], d["line"]) for d in record["documents"]] == \
        [(str(path), line) for line, _ in BAD] + [(str(binary), 3)]
    assert all(want in d["reason"] for d, (_, want) in zip(record["documents"], BAD))


def test_on_error_fail_leaves_no_output_and_prints_one_line(tmp_path, sp_model, capsys):
    path, _ = bad_corpus(tmp_path)
    args = ["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--tokenizer", sp_model,
            "--workers", "2", "--chunk-mb", "0.004", "--on-error", "fail"]
    assert main(args) == 2  # not --quiet: the progress line must not stray in either
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"tidar-megatron tokenize: error: {path}:301: malformed JSON ("), err
    assert err.strip().endswith("(--on-error fail)")
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith("out.") and not p.is_dir()]
    assert not {"out.bin", "out.idx", "out.meta.json"} & set(leftovers)
    assert not [p for p in tmp_path.rglob("*.tmp*")]


def test_cli_one_line_errors(tmp_path, sp_model, capsys):
    (tmp_path / "a.txt").write_text("hello")
    cases = [
        (["--input", str(tmp_path / "missing.jsonl"), "--tokenizer", sp_model], "missing.jsonl: input not found"),
        (["--input", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "a.txt")],
         "not a readable SentencePiece model"),
        (["--input", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "none.model")], "none.model: not found"),
    ]
    for args, message in cases:
        assert main(args + ["--output-prefix", str(tmp_path / "o"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["--input", str(tmp_path / "a.txt"), "--tokenizer", sp_model, "--output-prefix",
                 str(tmp_path / "o"), "--quiet", "--workers", "1"]) == 0
    before = (tmp_path / "o.bin").read_bytes()
    assert main(["--input", str(tmp_path / "a.txt"), "--tokenizer", sp_model, "--output-prefix",
                 str(tmp_path / "o"), "--quiet"]) == 2
    assert "output exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "o.bin").read_bytes() == before


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, sp_model):
    texts = [p.read_text(encoding="utf-8") for p in sorted((STDLIB / "logging").glob("*.py"))]
    inputs = []
    for i in range(16):  # 16 files of ~80 KB: one shard each, each taking a noticeable time
        inputs.append(str(tmp_path / f"part{i:02d}.jsonl"))
        write_jsonl(inputs[-1], [f"{i}:{j}\n" + t[j * 997 % len(t):][:2000] for j in range(40) for t in texts[:1]])
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "data_prep" / "tokenize.py"), "--input", *inputs, "--tokenizer", sp_model,
           "--output-prefix", str(killed), "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, stderr=subprocess.PIPE)
    shards = Path(f"{killed}.shards")
    deadline = time.time() + 90
    while not (shards.exists() and list(shards.glob("*.json"))):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no shard finished in time"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(shards.glob("*.json")))
    assert 1 <= finished < 16 and not Path(f"{killed}.idx").exists()

    resumed = tokenize_corpus(inputs, str(killed), sp_model, workers=2, progress=False)
    assert resumed["resumed_shards"] >= finished
    whole = tokenize_corpus(inputs, str(tmp_path / "whole"), sp_model, workers=1, progress=False)
    assert resumed["docs"] == whole["docs"] == 16 * 40
    for ext in (".bin", ".idx"):
        assert Path(f"{killed}{ext}").read_bytes() == Path(f"{tmp_path / 'whole'}{ext}").read_bytes()
    assert not shards.exists() and not list(tmp_path.rglob("*.tmp"))


def test_json_files_are_jsonl_only_when_they_look_like_it(tmp_path, sp_model):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a_package.json").write_text('{\n  "name": "x",\n  "version": "1.0"\n}\n')  # a source file
    write_jsonl(tree / "b_data.json", ["first", "second"])                             # Megatron's loose JSON
    tokenize_corpus([str(tree)], str(tmp_path / "out"), sp_model, workers=1, progress=False)
    assert read_back(tmp_path / "out", Tokenizer(sp_model)) == [(tree / "a_package.json").read_text(), "first", "second"]


def test_megatron_lm_preprocess_data_command_lines_work_unchanged(tmp_path, sp_model, capsys):
    """Megatron-LM's flags: output names <prefix>_<key>_document, one per --json-keys key, EOD only with
    --append-eod, accepted no-op flags, and a one-line error for each unsupported one."""
    docs = [{"text": f"def f{i}(x):\n    return x + {i}\n", "title": f"f{i}"} for i in range(5)]
    data = tmp_path / "docs.json"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    tok = Tokenizer(sp_model)
    line = ["--input", str(data), "--output-prefix", str(tmp_path / "mlm"), "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--json-keys", "text", "title",
            "--append-eod", "--workers", "2", "--partitions", "1", "--log-interval", "1000", "--keep-sequential-samples"]
    assert main(line) == 0
    assert read_back(tmp_path / "mlm_text_document", tok) == [d["text"] for d in docs]  # one EOD per document
    assert read_back(tmp_path / "mlm_title_document", tok) == [d["title"] for d in docs]
    # The same ids as our own command line for the same file.
    assert main(["--input", str(data), "--output-prefix", str(tmp_path / "ours"), "--tokenizer", sp_model,
                 "--quiet"]) == 0
    ours, theirs = IndexedDataset(str(tmp_path / "ours")), IndexedDataset(str(tmp_path / "mlm_text_document"))
    assert [ours[i].tolist() for i in range(len(ours))] == [theirs[i].tolist() for i in range(len(theirs))]
    # Without --append-eod, as in Megatron-LM, documents carry no EOD.
    assert main(line[:10] + ["--output-prefix", str(tmp_path / "noeod"), "--workers", "1"]) == 0
    plain = IndexedDataset(str(tmp_path / "noeod_text_document"))
    assert [plain[i].tolist() for i in range(len(plain))] == [theirs[i].tolist()[:-1] for i in range(len(theirs))]
    capsys.readouterr()
    for flag, message in [(["--split-sentences"], "--split-sentences: sentence splitting"),
                          (["--vocab-file", "v.json"], "--vocab-file: vocab/merge-file tokenizers"),
                          (["--lang", "english"], "--lang: only applies with --split-sentences")]:
        assert main(line + ["--output-prefix", str(tmp_path / "x")] + flag) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"tidar-megatron tokenize: error: {err.split('error: ', 1)[1]}" and message in err, err
    with pytest.raises(SystemExit):  # argparse: an unknown tokenizer type lists the supported ones
        main(["--input", str(data), "--output-prefix", "o", "--tokenizer-type", "GPT2BPETokenizer"])


def test_the_sidecar_says_what_made_the_data(tmp_path, sp_model):
    """Every field checked against an independent source: the files themselves, hashlib, the .bin read back."""
    import hashlib
    import importlib.metadata

    import numpy as np

    path, _ = bad_corpus(tmp_path)
    big = tmp_path / "big.txt"
    big.write_text("x = 1\n" * 30_000)  # > 64 KiB: the hash covers the first 64 KiB only
    tokenize_corpus([str(path), str(big)], str(tmp_path / "out"), sp_model, workers=1, progress=False)
    record = json.loads((tmp_path / "out.meta.json").read_text())
    tok = Tokenizer(sp_model)
    assert record["tokenizer"] == {"path": sp_model, "vocabulary_fingerprint": tok.vocabulary_fingerprint,
                                   "file_fingerprint": tok.fingerprint, "vocab_size": 600, "eod_id": tok.eod_id,
                                   "mask_token": "<|mask|>", "mask_id": tok.mask_id}
    assert record["tool"] == f"tidar-megatron {importlib.metadata.version('tidar_megatron')}"
    assert record["inputs"] == [{"path": str(p), "bytes": p.stat().st_size,
                                 "head_sha256": hashlib.sha256(p.read_bytes()[:64 << 10]).hexdigest()}
                                for p in (path, big)]
    ds = IndexedDataset(str(tmp_path / "out"))
    tokens = np.concatenate([ds[i] for i in range(len(ds))])
    assert (record["documents"], record["tokens"], record["max_token_id"], record["bin_bytes"]) == \
        (len(ds), len(tokens), int(tokens.max()), (tmp_path / "out.bin").stat().st_size)
    assert record["text_key"] == "text" and record["append_eod"] is True and record["dtype"] == "uint16"
    assert record["skipped"]["count"] == 5 and record["skipped"]["documents"][0]["line"] == 301
