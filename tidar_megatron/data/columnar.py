"""Parquet and Arrow inputs (FineWeb, DCLM, The Stack v2, `datasets.save_to_disk` directories), read with
pyarrow one row group (Parquet) or record batch (Arrow) at a time: a row is a document, its text in one
column.  A chunk is a run of consecutive row groups / record batches of one file, so memory follows the
row group size, never the file's, and the chunks of a file are the same in every run (resume).

Rows are numbered from 0 in the file, as `datasets` and pandas index them: a bad document is reported as
`<file> row <n>`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from tidar_megatron.data.chunks import Chunk, DocError, InputError

PARQUET_SUFFIXES = {".parquet", ".pq"}
ARROW_SUFFIXES = {".arrow", ".feather", ".ipc"}
_ROWS_PER_BATCH = 256  # rows turned into Python strings at a time

# No threads of pyarrow's own (jemalloc's background thread, set before pyarrow is first imported; below
# use_threads=False, no pre-buffering, no file reader): the tokenizer forks its workers after planning, and
# a thread alive at fork time may hold a lock the child then waits on forever (Python warns about it).
# Processes are the parallelism here.
os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")


def is_columnar(path: str) -> bool:
    return Path(path).suffix.lower() in PARQUET_SUFFIXES | ARROW_SUFFIXES


def _is_parquet(path: str) -> bool:
    return Path(path).suffix.lower() in PARQUET_SUFFIXES


def _pyarrow(path: str):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise InputError(f"{path}: Parquet/Arrow input needs pyarrow; pip install 'tidar_megatron[parquet]'") from None
    return pyarrow


def dataset_dir_files(directory: str) -> list[str] | None:
    """The Arrow files of a `datasets.save_to_disk` directory in the dataset's order (its state.json lists
    them), or None when `directory` is not one.  A DatasetDict (several splits) is an error that names the
    splits."""
    d = Path(directory)
    if (d / "dataset_dict.json").is_file():
        splits = json.loads((d / "dataset_dict.json").read_text()).get("splits", [])
        raise InputError(f"{directory}: a datasets DatasetDict with splits {', '.join(splits)}; give one split's "
                         f"directory, e.g. --input {d / (splits[0] if splits else 'train')}")
    state = d / "state.json"
    if not state.is_file():
        return None
    try:
        return [str(d / f["filename"]) for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError):  # another program's state.json: a plain directory
        return None


def _arrow_batches(pa, path: str):
    """(schema, record batches) of an Arrow IPC stream (what datasets writes) or file, memory-mapped.  A
    file is read as the stream it holds after its 8-byte magic (the IPC format puts it there): pyarrow's
    file reader starts I/O threads."""
    buffer = pa.memory_map(path).read_buffer()
    offset = 8 if buffer.size >= 8 and buffer.slice(0, 6).to_pybytes() == b"ARROW1" else 0
    reader = pa.ipc.open_stream(buffer.slice(offset), options=pa.ipc.IpcReadOptions(use_threads=False))
    return reader.schema, reader


def _text_column(schema, path: str, text_key: str) -> int:
    pa = _pyarrow(path)
    names = schema.names
    if text_key not in names:
        raise InputError(f"{path}: no column '{text_key}' (columns: {', '.join(names)}); name the text column with "
                         "--text-key (--json-keys with --tokenizer-type)")
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise InputError(f"{path}: column '{text_key}' holds {kind}, not text; name the text column with --text-key")
    return names.index(text_key)


def plan(path: str, chunk_bytes: int, text_key: str) -> list[Chunk]:
    """Chunks of consecutive row groups / record batches holding about `chunk_bytes` of text each (at
    least one unit each); reads only the file's metadata (Parquet) or batch headers (Arrow)."""
    pa = _pyarrow(path)
    try:
        if _is_parquet(path):  # text bytes per row group
            meta = pa.parquet.ParquetFile(path, pre_buffer=False).metadata
            column = _text_column(meta.schema.to_arrow_schema(), path, text_key)
            sizes = [meta.row_group(i).column(column).total_uncompressed_size for i in range(meta.num_row_groups)]
        else:  # ... per record batch
            schema, batches = _arrow_batches(pa, path)
            column = _text_column(schema, path, text_key)
            sizes = [b.column(column).nbytes for b in batches]
    except pa.ArrowException as e:
        raise InputError(f"{path}: not a readable {'Parquet' if _is_parquet(path) else 'Arrow'} file "
                         f"({str(e).splitlines()[0]})") from None
    stamp = (os.stat(path).st_size, os.stat(path).st_mtime_ns)
    total = sum(sizes) or 1
    chunks, start, taken = [], 0, 0
    for i, size in enumerate(sizes):
        taken += size
        if taken >= chunk_bytes or i == len(sizes) - 1:
            chunks.append(Chunk((path,), start, i + 1, stamp[0] * taken // total, (stamp,)))
            start, taken = i + 1, 0
    return chunks


def read(chunk: Chunk, text_key: str) -> Iterator[tuple[int, str | DocError]]:
    """(text bytes, the row's text or a DocError) for every row of the chunk (end -1: to the file's end),
    in order."""
    path = chunk.paths[0]
    pa = _pyarrow(path)
    if _is_parquet(path):
        parquet = pa.parquet.ParquetFile(path, pre_buffer=False)
        first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(chunk.start))
        end = parquet.metadata.num_row_groups if chunk.end < 0 else chunk.end
        batches = parquet.iter_batches(batch_size=_ROWS_PER_BATCH, row_groups=range(chunk.start, end),
                                       columns=[text_key], use_threads=False)
        column = 0
    else:
        schema, stream = _arrow_batches(pa, path)
        column = schema.names.index(text_key)
        batches, first_row = [], 0
        for i, batch in enumerate(stream):  # memory-mapped: skipping reads no text
            if i >= chunk.end >= 0:
                break
            if i < chunk.start:
                first_row += batch.num_rows
            else:
                batches.append(batch)
    row = first_row
    for batch in batches:
        for offset in range(0, batch.num_rows, _ROWS_PER_BATCH):
            rows = batch.column(column).slice(offset, _ROWS_PER_BATCH)
            # As bytes, so that invalid UTF-8 (Arrow does not check it) is one bad document, not a crash.
            for raw in rows.cast(pa.large_binary()).to_pylist():
                yield (len(raw) if raw else 0), _row_text(path, row, raw, text_key)
                row += 1


def _row_text(path: str, row: int, raw: bytes | None, text_key: str) -> str | DocError:
    if raw is None:
        return DocError(path, row, f"'{text_key}' is null", unit="row")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DocError(path, row, f"invalid UTF-8 at byte {e.start}", unit="row")
    return text if text else DocError(path, row, "empty document", unit="row")
