"""What a tokenized prefix says about itself: `<prefix>.meta.json`, written by `tidar-megatron tokenize`
beside every `<prefix>.bin` / `<prefix>.idx` (before the .idx is published, so a complete pair always has
its sidecar).  Megatron-LM's own .bin/.idx have none.

    {"format": "tidar-megatron tokenized data", "format_version": 1,
     "tool": "tidar-megatron 0.1.0", "created": "2026-12-03T10:00:00Z",
     "tokenizer": {"path": "tok.model", "vocabulary_fingerprint": "7ff20b6f4924232f",
                   "file_fingerprint": "…", "vocab_size": 601, "eod_id": 2, "mask_token": "<|mask|>",
                   "mask_id": 3},
     "text_key": "text", "append_eod": true, "dtype": "uint16",
     "inputs": [{"path": "corpus/a.jsonl", "bytes": 123456, "head_sha256": "…"}, …],
     "documents": 1000, "tokens": 250000, "max_token_id": 599, "bin_bytes": 500000,
     "empty_files": 0,
     "skipped": {"count": 2, "documents": [{"file": "corpus/a.jsonl", "line": 17, "reason": "malformed JSON …"},
                                          {"file": "corpus/b.parquet", "row": 4, "reason": "empty document"}]}}

`vocabulary_fingerprint` is `Tokenizer.vocabulary_fingerprint`: it names what the ids mean, whichever file
or directory holds the tokenizer.  `head_sha256` hashes an input's first 64 KiB (cheap for millions of
files, and enough to tell two corpora apart).  The checks that read a sidecar are in prefix_check.py.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

from tidar_megatron.atomic import write_atomic
from tidar_megatron.data.chunks import DocError
from tidar_megatron.data.tokenizer import Tokenizer

SUFFIX = ".meta.json"
FORMAT = "tidar-megatron tokenized data"
FORMAT_VERSION = 1
_HEAD_BYTES = 64 << 10


def path_of(prefix: str) -> Path:
    return Path(f"{prefix}{SUFFIX}")


def tokenizer_record(tok: Tokenizer) -> dict:
    return {"path": tok.path, "vocabulary_fingerprint": tok.vocabulary_fingerprint,
            "file_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id,
            "mask_token": tok.mask_token, "mask_id": tok.mask_id}


def input_record(path: str) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_HEAD_BYTES))
    return {"path": path, "bytes": os.path.getsize(path), "head_sha256": h.hexdigest()}


def skipped_record(doc: DocError) -> dict:
    return {"file": doc.path, doc.unit: doc.line, "reason": doc.reason}


def build(tok: Tokenizer, *, text_key: str, append_eod: bool, dtype, inputs: list[str], documents: int,
          tokens: int, max_token_id: int, empty_files: int, skipped: list[DocError]) -> dict:
    """The sidecar of one output, all but `bin_bytes` (added by `write`, from the file itself)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "tool": f"tidar-megatron {importlib.metadata.version('tidar_megatron')}",
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tokenizer": tokenizer_record(tok), "text_key": text_key, "append_eod": append_eod,
            "dtype": dtype.__name__, "inputs": [input_record(p) for p in inputs], "documents": documents,
            "tokens": tokens, "max_token_id": max_token_id, "empty_files": empty_files,
            "skipped": {"count": len(skipped), "documents": [skipped_record(d) for d in skipped]}}


def write(prefix: str, record: dict, bin_path: str | Path) -> None:
    """Write `record` (with the size of `bin_path`, the .bin it describes) as `prefix`'s sidecar."""
    write_atomic(path_of(prefix), json.dumps({**record, "bin_bytes": os.path.getsize(bin_path)}, indent=1) + "\n")


def read(prefix: str) -> dict | None:
    """The sidecar of `prefix`, None when it has none (Megatron-LM data); ValueError when it is not one."""
    path = path_of(prefix)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tidar-megatron sidecar")
    return record
