"""Input discovery and reading for tokenizer training and corpus tokenization.

An input is a JSONL file (one JSON object per line, the text under a configurable key), a Parquet or Arrow
file or a `datasets.save_to_disk` directory (a row per document, the text in a column: columnar.py), or any
other file, which is one document (source files, plain text).  gzip (.gz) and zstd (.zst/.zstd) are
decompressed on the fly.  Work is cut into `Chunk`s whose boundaries depend only on the inputs, so a rerun
after a crash plans exactly the same chunks and can reuse the ones already finished.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterator

from tidar_megatron.data import columnar
from tidar_megatron.data.chunks import Chunk, DocError, InputError

JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
COMPRESSED_SUFFIXES = {".gz", ".zst", ".zstd"}


def _suffixes(path: str) -> tuple[str, str]:
    """(format suffix, compression suffix) e.g. ('.jsonl', '.gz')."""
    p = Path(path)
    comp = p.suffix.lower() if p.suffix.lower() in COMPRESSED_SUFFIXES else ""
    fmt = Path(p.stem).suffix.lower() if comp else p.suffix.lower()
    return fmt, comp


def is_compressed(path: str) -> bool:
    return bool(_suffixes(path)[1])


@functools.lru_cache(maxsize=None)
def is_jsonl(path: str) -> bool:
    """.jsonl / .ndjson, or a .json file whose first line is a JSON object (Megatron's loose JSON); other
    .json files (package.json in a source tree) are documents like any source file."""
    fmt = _suffixes(path)[0]
    if fmt != ".json":
        return fmt in JSONL_SUFFIXES
    with open_binary(path) as f:
        first = f.readline()
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def open_binary(path: str):
    comp = _suffixes(path)[1]
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp in (".zst", ".zstd"):
        try:
            import zstandard
        except ImportError:
            raise InputError(f"{path}: zstd input needs the 'zstandard' package; "
                             f"install it with pip install 'tidar_megatron[zstd]'") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def is_binary(path: str) -> bool:
    """A file that is not text: a NUL byte in its first 8 KiB, as git and grep decide (compressed inputs
    are text once decompressed)."""
    if is_compressed(path):
        return False
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def find_inputs(paths: list[str], glob: str = "**/*", text_only: bool = True) -> list[str]:
    """Expand files and directories (recursively, with `glob`) into a sorted, de-duplicated file list.

    A `datasets.save_to_disk` directory gives its Arrow files in the dataset's order, and a directory that
    holds Parquet / Arrow files gives only those (a dataset's README is no document).  From other
    directories only text files are taken (`text_only`): a source tree's `__pycache__/*.pyc`, images or
    archives are not documents.  Files named explicitly are always taken (and reported if bad)."""
    found: list[str] = []
    for p in paths:
        if os.path.isdir(p) and (dataset := columnar.dataset_dir_files(p)) is not None:
            found.extend(dataset)
        elif os.path.isdir(p):
            matches = sorted(str(f) for f in Path(p).glob(glob) if f.is_file())
            tables = [f for f in matches if columnar.is_columnar(f)]
            if tables:
                matches = tables
            elif text_only:
                matches = [f for f in matches if not is_binary(f)]
            if not matches:
                raise InputError(f"{p}: no {'text ' if text_only else ''}files match --glob '{glob}'")
            found.extend(matches)
        elif os.path.isfile(p):
            found.append(p)
        else:
            raise InputError(f"{p}: input not found; check the path")
    return list(dict.fromkeys(found))


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def plan_chunks(files: list[str], chunk_bytes: int, text_key: str = "text") -> list[Chunk]:
    """Cut uncompressed JSONL at line starts every ~chunk_bytes and Parquet / Arrow files at row groups /
    record batches; pack consecutive one-document files into chunks of ~chunk_bytes; a compressed JSONL
    file cannot be seeked, so it is one chunk."""
    chunks: list[Chunk] = []
    group: list[str] = []
    group_bytes = 0

    def flush():
        nonlocal group, group_bytes
        if group:
            chunks.append(Chunk(tuple(group), disk_bytes=group_bytes, stamps=tuple(map(_stamp, group))))
            group, group_bytes = [], 0

    for path in files:
        size = os.path.getsize(path)
        if columnar.is_columnar(path):
            flush()
            chunks.extend(columnar.plan(path, chunk_bytes, text_key))
            continue
        if not is_jsonl(path):
            group.append(path)
            group_bytes += size
            if group_bytes >= chunk_bytes:
                flush()
            continue
        flush()
        if is_compressed(path):
            chunks.append(Chunk((path,), disk_bytes=size, stamps=(_stamp(path),)))
            continue
        with open(path, "rb") as f:
            start = 0
            while start < size:
                f.seek(min(start + chunk_bytes, size))
                f.readline()  # move the cut to the next line start
                end = min(f.tell(), size)
                chunks.append(Chunk((path,), start, end, end - start, (_stamp(path),)))
                start = end
    flush()
    return chunks


def _file_doc(path: str, raw: bytes) -> str | DocError | None:
    """A whole file as one document; None for an empty file (an empty __init__.py is no error)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DocError(path, raw.count(b"\n", 0, e.start) + 1, f"invalid UTF-8 at byte {e.start}")
    return text or None


def _jsonl_docs(path: str, lines: Iterator[bytes], text_key: str):
    for n, raw in enumerate(lines, 1):
        yield len(raw), _parse_json_line(path, raw, n, text_key)


def _parse_json_line(path: str, raw: bytes, n: int, text_key: str) -> str | DocError:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DocError(path, n, f"invalid UTF-8 at byte {e.start} of the line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return DocError(path, n, f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
    if not isinstance(obj, dict) or text_key not in obj:
        return DocError(path, n, f"missing key '{text_key}' (set --text-key)")
    text = obj[text_key]
    if not isinstance(text, str):
        return DocError(path, n, f"key '{text_key}' holds {type(text).__name__}, not a string")
    try:
        text.encode("utf-8")  # JSON escapes can smuggle in lone surrogates
    except UnicodeEncodeError:
        return DocError(path, n, "text holds a lone surrogate (not valid Unicode)")
    return text if text else DocError(path, n, "empty document")


def read_chunk(chunk: Chunk, text_key: str = "text") -> Iterator[tuple[int, str | DocError | None]]:
    """Yield (input bytes consumed, the document's text, a DocError, or None for an empty file), in input
    order."""
    if len(chunk.paths) == 1 and columnar.is_columnar(chunk.paths[0]):
        yield from columnar.read(chunk, text_key)
        return
    if len(chunk.paths) == 1 and is_jsonl(chunk.paths[0]):
        path = chunk.paths[0]
        with open_binary(path) as f:
            if chunk.end < 0:
                yield from _jsonl_docs(path, f, text_key)
                return
            f.seek(chunk.start)
            remaining = chunk.end - chunk.start

            def lines():
                nonlocal remaining
                while remaining > 0:
                    raw = f.readline()
                    if not raw:
                        return
                    remaining -= len(raw)
                    yield raw
            yield from _jsonl_docs(path, lines(), text_key)
        return
    for path in chunk.paths:
        with open_binary(path) as f:
            raw = f.read()
        yield len(raw), _file_doc(path, raw)


def iter_texts(files: list[str], text_key: str = "text", max_bytes_per_file: int | None = None):
    """Valid documents of `files` in order (bad ones silently dropped), at most ~max_bytes_per_file each:
    the sample a tokenizer is trained on."""
    for path in files:
        taken = 0
        for nbytes, doc in read_chunk(Chunk((path,)), text_key):
            if isinstance(doc, str):
                yield doc
                taken += nbytes
                if max_bytes_per_file is not None and taken >= max_bytes_per_file:
                    break
