"""Tokenize JSONL / Parquet / Arrow / text / source trees into Megatron `<prefix>.bin` / `<prefix>.idx`,
with a sidecar `<prefix>.meta.json` (sidecar.py) saying what made them.

Each chunk of input (see `corpus.plan_chunks`) becomes one shard, written by a worker process straight to
disk (no token ids travel between processes), then the shards are merged in input order with
`IndexedDatasetBuilder.add_index`.  Every file is written under a temporary name and renamed when complete;
a shard counts as finished only once its summary `.json` exists, so a killed run, rerun with the same
arguments, redoes only the unfinished shards and produces the same output as an uninterrupted run (and
removes the temporaries the kill left).  An input that yields no document is an error, not an empty .bin.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import gc
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from tidar_megatron.atomic import atomic_path, sweep_temporaries, write_atomic
from tidar_megatron.console import entry_point
from tidar_megatron.console import quiet_third_party_warnings
from tidar_megatron.data import columnar, sidecar
from tidar_megatron.data.corpus import (
    Chunk,
    DocError,
    InputError,
    find_inputs,
    is_compressed,
    is_jsonl,
    plan_chunks,
    read_chunk,
)
from tidar_megatron.data.tokenizer import MASK_TOKEN, Tokenizer
from tidar_megatron.errors import TiDARError

_PROGRESS_EVERY_DOCS = 256
_PROGRESS_EVERY_BYTES = 4 << 20
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# Per-worker state, set by _init_worker (one tokenizer per process, loaded once).
_worker: dict = {}


class FatalDocumentError(TiDARError):
    pass


class _ShardFailed(Exception):
    """A bad document under --on-error fail: the shard is abandoned, nothing of it is published."""


class _ShardIOError(Exception):
    """An input vanished or a write failed in a worker: one line, picklable back to the main process."""


@contextlib.contextmanager
def _indexed_dataset(prefix: str, dtype, record: dict | None = None):
    """An IndexedDatasetBuilder whose <prefix>.bin and .idx appear only if the block succeeds: the old .idx
    goes first, then the sidecar `record` (if any) is written and the new .idx comes last, so an .idx always
    means a complete pair with its sidecar."""
    IndexedDatasetBuilder = _megatron_indexed().IndexedDatasetBuilder
    with atomic_path(f"{prefix}.idx") as tmp_idx, atomic_path(f"{prefix}.bin") as tmp_bin:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        try:
            yield builder
            builder.finalize(str(tmp_idx))
        finally:
            builder.data_file.close()
        Path(f"{prefix}.idx").unlink(missing_ok=True)
        if record is not None:
            sidecar.write(prefix, record, tmp_bin)


def _megatron_indexed():
    """megatron.core's indexed_dataset module, without its start-up warnings (TE/Apex missing, no rank
    known) that would bury the progress line, also when called as a library; importing megatron.core
    takes seconds, so it is imported when needed."""
    quiet_third_party_warnings()
    from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _init_worker(tokenizer_path, mask_token, text_key, on_error, counters, append_eod=True):
    DType = _megatron_indexed().DType
    tok = Tokenizer(tokenizer_path, mask_token)
    _worker.update(tok=tok, text_key=text_key, on_error=on_error, counters=counters, append_eod=append_eod,
                   dtype=DType.optimal_dtype(tok.vocab_size))


def _bump(counters, docs, tokens, text_bytes, disk_bytes):
    if counters is not None:
        with counters.get_lock():
            for i, v in enumerate((docs, tokens, text_bytes, disk_bytes)):
                counters[i] += v


def _io_message(e: OSError, writing: str) -> str:
    """One line for a failed read or write: the file, what happened and, for a full disk, what to do."""
    where = f"{e.filename}" if e.filename else f"writing {writing}"
    if e.errno in _OUT_OF_SPACE:
        return f"{where}: out of space ({e.strerror}); free some space (or raise the quota)"
    return f"{where}: {e.strerror or e}"


def _tokenize_chunk(job: tuple[int, Chunk, str]) -> dict:
    """Write one shard; return its summary (also stored as the shard's completion marker)."""
    index, chunk, prefix = job
    counters = _worker["counters"]
    stats = {"index": index, "docs": 0, "tokens": 0, "max_id": -1, "text_bytes": 0, "lines": 0, "empty_files": 0,
             "errors": [], "relative_lines": len(chunk.paths) == 1 and is_jsonl(chunk.paths[0])}
    # Progress is reported in batches (the counters take a lock).  Compressed and columnar input counts
    # towards the ETA (which is by on-disk bytes) only when its chunk is done.
    plain = not any(is_compressed(p) or columnar.is_columnar(p) for p in chunk.paths)
    pending = [0, 0, 0, 0]  # docs, tokens, text bytes, disk bytes
    try:
        with _indexed_dataset(prefix, _worker["dtype"]) as builder:
            disk_reported = _write_shard(builder, chunk, stats, pending, plain)
    except _ShardFailed as failed:
        return {**stats, "failed": list(failed.args)}
    except OSError as e:
        raise _ShardIOError(_io_message(e, f"shard {prefix}")) from None
    _write_json_atomic(f"{prefix}.json", stats)  # the completion marker: written last
    _bump(counters, *pending[:3], chunk.disk_bytes - disk_reported)
    return stats


def _write_shard(builder, chunk, stats, pending, plain) -> int:
    """The documents of `chunk` into `builder`, counted into `stats` and `pending` (progress not yet
    reported); returns the disk bytes already reported."""
    tok, dtype, counters = _worker["tok"], _worker["dtype"], _worker["counters"]
    eod = [tok.eod_id] if _worker["append_eod"] else []
    disk_reported = 0
    for nbytes, doc in read_chunk(chunk, _worker["text_key"]):
        stats["lines"] += 1
        stats["text_bytes"] += nbytes
        pending[2] += nbytes
        pending[3] += nbytes if plain else 0
        if doc is None:
            stats["empty_files"] += 1
            continue
        if isinstance(doc, DocError):
            if _worker["on_error"] == "fail":
                raise _ShardFailed(doc.path, doc.line, doc.reason, doc.unit)
            stats["errors"].append([doc.path, doc.line, doc.reason, doc.unit])
            continue
        ids = np.append(tok.encode_array(doc, dtype), np.asarray(eod, dtype))
        builder.add_document(ids, [len(ids)])
        stats["docs"] += 1
        stats["tokens"] += len(ids)
        stats["max_id"] = max(stats["max_id"], int(ids.max()) if len(ids) else -1)
        pending[0] += 1
        pending[1] += len(ids)
        if pending[0] >= _PROGRESS_EVERY_DOCS or pending[2] >= _PROGRESS_EVERY_BYTES:
            _bump(counters, *pending)
            disk_reported += pending[3]
            pending[:] = [0, 0, 0, 0]
    return disk_reported


def _write_json_atomic(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj))


def _shard_names(chunks: list[Chunk], tok: Tokenizer, text_key: str, append_eod: bool) -> list[str]:
    """Names that change whenever the shard's content could: the chunk, its files' size/mtime, the
    tokenizer's content, the text key and whether EOD is appended."""
    names = []
    for i, c in enumerate(chunks):
        key = json.dumps([c.paths, c.start, c.end, c.stamps, tok.fingerprint, text_key] + ([] if append_eod else [0]))
        names.append(f"{i:06d}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")
    return names


def _prepare_shards(shard_dir: Path, chunks: list[Chunk], tok: Tokenizer, text_key: str, append_eod: bool):
    """Shard path prefixes, and the summaries of the shards a previous run finished."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    names = _shard_names(chunks, tok, text_key, append_eod)
    wanted = set(names)
    for f in shard_dir.iterdir():  # shards of another plan (changed inputs/tokenizer) or torn writes
        if f.name.split(".")[0] not in wanted or f.name.endswith(".tmp"):
            f.unlink()
    prefixes = [str(shard_dir / n) for n in names]
    done = {i: json.loads(Path(f"{p}.json").read_text()) for i, p in enumerate(prefixes)
            if os.path.exists(f"{p}.json")}
    return prefixes, done


def _merge_shards(prefixes: list[str], results: dict, output_prefix: str, dtype, record: dict) -> None:
    """Concatenate the shards in input order under temporary names; the sidecar is written before the
    .idx is renamed last, so the presence of the .idx means the output is complete."""
    # add_index runs gc.collect() per shard, ~0.5 s each with torch and megatron.core loaded; frozen
    # objects are not scanned, which makes it cheap.
    gc.freeze()
    try:
        with _indexed_dataset(output_prefix, dtype, record) as builder:
            for i, p in enumerate(prefixes):
                if results[i]["docs"]:
                    builder.add_index(p)
    finally:
        gc.unfreeze()


class _Progress:
    """One status line on stderr: documents, tokens/s, MB/s, ETA (by input bytes)."""

    def __init__(self, counters, total_disk_bytes: int, enabled: bool, interval: float):
        self.counters, self.total, self.enabled, self.interval = counters, total_disk_bytes, enabled, interval
        self.start = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, force: bool = False):
        now = time.time()
        if not self.enabled or (not force and now - self.last < self.interval):
            return
        self.last = now
        docs, tokens, text_bytes, disk_bytes = self.counters[:]
        dt = max(now - self.start, 1e-9)
        frac = disk_bytes / self.total if self.total else 1.0
        eta = f"{dt * (1 - frac) / frac:.0f}s" if frac > 0 else "?"
        line = (f"{int(docs):,} docs | {tokens / dt:,.0f} tok/s | {text_bytes / dt / 1e6:.1f} MB/s | "
                f"{100 * frac:.1f}% | ETA {eta}")
        print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=sys.stderr)


def _check_output(output_prefix: str, files: list[str], overwrite: bool) -> None:
    if os.path.exists(f"{output_prefix}.idx") and not overwrite:
        raise InputError(f"{output_prefix}.idx: output exists; pass --overwrite or choose another --output-prefix")
    outputs = {os.path.realpath(f"{output_prefix}{s}") for s in (".bin", ".idx", sidecar.SUFFIX)}
    clash = [f for f in files if os.path.realpath(f) in outputs or
             os.path.realpath(f).startswith(os.path.realpath(f"{output_prefix}.shards") + os.sep)]
    if clash:
        raise InputError(f"--output-prefix {output_prefix} would overwrite the input {clash[0]}; choose another prefix")
    for suffix in (".bin", ".idx", sidecar.SUFFIX):  # left by a run killed while publishing
        sweep_temporaries(f"{output_prefix}{suffix}")


def tokenize_corpus(inputs: list[str], output_prefix: str, tokenizer: str, *, text_key: str = "text",
                    glob: str = "**/*", workers: int | None = None, chunk_mb: float = 256,
                    on_error: str = "skip", mask_token: str = MASK_TOKEN, overwrite: bool = False,
                    keep_shards: bool = False, progress: bool = True, log_interval: float = 2.0,
                    max_errors_shown: int = 5, append_eod: bool = True) -> dict:
    """Tokenize `inputs` into `output_prefix`.bin/.idx/.meta.json; return the summary.  Raises InputError,
    TokenizerError or FatalDocumentError with a one-line message (also for a vanished input or a full
    disk: a rerun then resumes).  `append_eod`: end every document with the tokenizer's end-of-document id
    (the training datasets' document boundary)."""
    if on_error not in ("skip", "fail"):
        raise InputError(f"--on-error must be 'skip' or 'fail', got {on_error!r}")
    t0 = time.time()
    tok = Tokenizer(tokenizer, mask_token)
    dtype = _megatron_indexed().DType.optimal_dtype(tok.vocab_size)  # imported before the workers fork
    files = find_inputs(inputs, glob)
    _check_output(output_prefix, files, overwrite)
    shard_dir = Path(f"{output_prefix}.shards")
    try:
        # Enough chunks to keep every worker busy to the end, from the input size alone (not the worker
        # count), so that a resumed run plans the same shards.
        total_bytes = sum(os.path.getsize(f) for f in files)
        chunks = plan_chunks(files, min(int(chunk_mb * (1 << 20)), max(1 << 20, total_bytes // 64)), text_key)
        prefixes, done = _prepare_shards(shard_dir, chunks, tok, text_key, append_eod)
        results, skipped = _run_shards(chunks, prefixes, done, tokenizer, mask_token, text_key, on_error,
                                       append_eod, workers, progress, log_interval)
    except (OSError, _ShardIOError) as e:
        message = _io_message(e, str(shard_dir)) if isinstance(e, OSError) else str(e)
        finished = len(list(shard_dir.glob("*.json"))) if shard_dir.is_dir() else 0
        raise InputError(f"{message}; {finished} finished shard(s) are kept in {shard_dir}: rerun the same "
                         "command to resume") from None

    total = {k: sum(r.get(k, 0) for r in results.values()) for k in ("docs", "tokens", "text_bytes", "empty_files")}
    total["error_count"] = len(skipped)
    if not total["docs"]:
        if not keep_shards:
            shutil.rmtree(shard_dir)
        first = f" (first: {skipped[0].location}: {skipped[0].reason})" if skipped else ""
        raise InputError(f"no documents in {len(files)} input file(s) ({total['empty_files']} empty, "
                         f"{len(skipped)} bad documents{first}); nothing written to {output_prefix}.bin")
    try:
        record = sidecar.build(tok, text_key=text_key, append_eod=append_eod, dtype=dtype, inputs=files,
                               documents=total["docs"], tokens=total["tokens"],
                               max_token_id=max(r["max_id"] for r in results.values()),
                               empty_files=total["empty_files"], skipped=skipped)
        _merge_shards(prefixes, results, output_prefix, dtype, record)
    except OSError as e:
        raise InputError(f"{_io_message(e, f'{output_prefix}.bin/.idx')}; the {len(chunks)} finished shards are "
                         f"kept in {shard_dir}: rerun the same command to resume") from None
    if not keep_shards:
        shutil.rmtree(shard_dir)

    dt = time.time() - t0
    total.update(seconds=dt, shards=len(chunks), resumed_shards=len(done), output=output_prefix,
                 tokens_per_s=total["tokens"] / dt, mb_per_s=total["text_bytes"] / dt / 1e6, skipped=skipped)
    if progress:
        _print_summary(total, skipped, output_prefix, max_errors_shown)
    return total


def _run_shards(chunks, prefixes, done, tokenizer, mask_token, text_key, on_error, append_eod, workers,
                progress, log_interval) -> tuple[dict, list[DocError]]:
    """Tokenize the chunks not `done` into their shards; returns every shard's summary and the bad
    documents in input order, with absolute line numbers."""
    todo = [(i, chunks[i], prefixes[i]) for i in range(len(chunks)) if i not in done]
    counters = mp.get_context("fork").Array("d", 4)
    prog = _Progress(counters, sum(c.disk_bytes for _, c, _ in todo) or 1, progress, log_interval)
    init_args = (tokenizer, mask_token, text_key, on_error, counters, append_eod)
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    results = dict(done)
    line_offset: dict[str, int] = {}
    skipped: list[DocError] = []

    def report(i: int, stats: dict):
        """Consume shard i's result in input order, so a JSONL chunk's line offset is known."""
        results[i] = stats
        path = chunks[i].paths[0]
        offset = line_offset.get(path, 0) if stats["relative_lines"] else 0
        if "failed" in stats:
            p, line, reason, unit = stats["failed"]
            bad = DocError(p, line + (offset if unit == "line" else 0), reason, unit)
            raise FatalDocumentError(f"{bad.location}: {reason} (--on-error fail)")
        for p, line, reason, unit in stats["errors"]:
            skipped.append(DocError(p, line + (offset if unit == "line" else 0), reason, unit))
        if stats["relative_lines"]:
            line_offset[path] = offset + stats["lines"]

    def consume(stream):
        pending = dict(done)
        for i in range(len(chunks)):
            if i in pending:
                report(i, pending.pop(i))
                continue
            while True:
                try:
                    stats = next(stream)
                    break
                except mp.TimeoutError:
                    prog.update()
            report(stats["index"], stats)
            prog.update()

    try:
        if workers == 1:
            _init_worker(*init_args)
            consume(iter(map(_tokenize_chunk, todo)))
        else:
            with mp.get_context("fork").Pool(workers, _init_worker, init_args) as pool:
                consume(_BoundedResults(pool, _tokenize_chunk, todo, 2 * workers, log_interval))
                pool.close()  # workers exit on their own: terminating them races the pool's refilling thread
                pool.join()
        if counters[0]:  # the final figures, when there are any (no documents is an error of its own)
            prog.update(force=True)
    finally:
        prog.close()
    return results, skipped


def _print_summary(total: dict, skipped: list[DocError], output_prefix: str, shown: int) -> None:
    print(f"done: {total['docs']:,} documents, {total['tokens']:,} tokens, {total['text_bytes'] / 1e6:.1f} MB "
          f"in {total['seconds']:.1f}s ({total['tokens_per_s']:,.0f} tok/s, {total['mb_per_s']:.1f} MB/s); "
          f"skipped {len(skipped)} bad documents; "
          + (f"left out {total['empty_files']} empty files; " if total["empty_files"] else "") +
          f"{total['resumed_shards']}/{total['shards']} shards reused; wrote {output_prefix}.bin, .idx and "
          f"{sidecar.SUFFIX}", file=sys.stderr)
    for doc in skipped[:shown]:
        print(f"skipped {doc.location}: {doc.reason}", file=sys.stderr)
    if len(skipped) > shown:
        print(f"... and {len(skipped) - shown} more: all are listed in {sidecar.path_of(output_prefix)}",
              file=sys.stderr)


class _BoundedResults:
    """`pool.imap(fn, items)` in order, with at most `window` tasks handed to the pool at a time and a timeout
    per result (mp.TimeoutError, so the progress line keeps moving during long shards).

    Bounded rather than imap's all-at-once: when a worker raises, leaving the `with Pool` terminates the pool,
    and with thousands of small chunks queued the pool's task thread can be blocked writing to the workers'
    pipe, which terminate() then waits for: the run hung instead of reporting the error (seen under load)."""

    def __init__(self, pool, fn, items, window: int, timeout: float):
        self.pool, self.fn, self.items, self.timeout = pool, fn, iter(items), timeout
        self.pending = collections.deque(pool.apply_async(fn, (item,)) for item in itertools.islice(self.items, window))

    def __iter__(self):
        return self

    def __next__(self):
        if not self.pending:
            raise StopIteration
        result = self.pending[0].get(timeout=self.timeout)
        self.pending.popleft()
        for item in itertools.islice(self.items, 1):
            self.pending.append(self.pool.apply_async(self.fn, (item,)))
        return result


MEGATRON_TOKENIZERS = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer")
# Megatron-LM preprocess_data.py flags we do not support, with the reason (one line each).
MEGATRON_UNSUPPORTED = {
    "--split-sentences": "sentence splitting (nltk) is not supported; documents are kept whole",
    "--keep-newlines": "only applies with --split-sentences, which is not supported",
    "--lang": "only applies with --split-sentences, which is not supported",
    "--vocab-file": "vocab/merge-file tokenizers (GPT2BPETokenizer, BertWordPiece*) are not supported; use "
                    "SentencePieceTokenizer or HuggingFaceTokenizer with --tokenizer-model",
    "--merge-file": "vocab/merge-file tokenizers are not supported; use --tokenizer-model",
    "--vocab-size": "NullTokenizer is not supported; use a real tokenizer with --tokenizer-model",
    "--tokenizer-metadata": "not supported; give the tokenizer with --tokenizer-model",
    "--tokenizer-special-tokens": "not supported; special tokens come from the tokenizer itself",
    "--tiktoken-pattern": "TikTokenizer is not supported",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tidar-megatron tokenize", description=__doc__.splitlines()[0],
                                 epilog="Megatron-LM's tools/preprocess_data.py command lines work unchanged: with "
                                 "--tokenizer-type, outputs are named <prefix>_<key>_document.bin/.idx per --json-keys "
                                 "key and EOD is appended only with --append-eod, as there.")
    ap.add_argument("--input", nargs="+", required=True, help="files and/or directories: JSONL (.gz/.zst ok), "
                    "Parquet, Arrow, a datasets.save_to_disk directory, text, source trees")
    ap.add_argument("--output-prefix", required=True, help=f"writes <prefix>.bin, <prefix>.idx and <prefix>{sidecar.SUFFIX}")
    ap.add_argument("--tokenizer", help="SentencePiece .model file or Hugging Face tokenizer directory")
    ap.add_argument("--text-key", default="text", help="JSONL key or Parquet/Arrow column holding the document text")
    ap.add_argument("--glob", default="**/*", help="files to take from input directories, e.g. '**/*.py'")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--chunk-mb", type=float, default=256, help="at most this many input MB per shard (the unit of parallelism and resume)")
    ap.add_argument("--on-error", choices=("skip", "fail"), default="skip")
    ap.add_argument("--mask-token", default=MASK_TOKEN)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ap.add_argument("--keep-shards", action="store_true")
    ap.add_argument("--log-interval", type=float, default=2.0, help="seconds between progress lines (with "
                    "--tokenizer-type: Megatron-LM's documents between log lines, accepted and unused)")
    ap.add_argument("--quiet", action="store_true")
    megatron = ap.add_argument_group("Megatron-LM preprocess_data.py flags")
    megatron.add_argument("--tokenizer-type", choices=MEGATRON_TOKENIZERS)
    megatron.add_argument("--tokenizer-model", help="with --tokenizer-type: the .model file or HF tokenizer directory")
    megatron.add_argument("--json-keys", nargs="+", help="with --tokenizer-type: the JSON keys / columns to tokenize, "
                          "one output each (default text); without it, one key, the same as --text-key")
    megatron.add_argument("--append-eod", action="store_true", help="with --tokenizer-type: end documents with EOD")
    megatron.add_argument("--partitions", type=int, default=1, help="accepted; the input is sharded by size instead")
    megatron.add_argument("--keep-sequential-samples", action="store_true", help="accepted; outputs keep input order")
    for flag in MEGATRON_UNSUPPORTED:
        megatron.add_argument(flag, nargs="?", const=True, help=argparse.SUPPRESS)
    return ap


@entry_point("tidar-megatron tokenize")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, reason in MEGATRON_UNSUPPORTED.items():
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None:
            raise InputError(f"{flag}: {reason}")
    common = dict(glob=args.glob, workers=args.workers, chunk_mb=args.chunk_mb, on_error=args.on_error,
                  mask_token=args.mask_token, overwrite=args.overwrite, keep_shards=args.keep_shards,
                  progress=not args.quiet)
    if args.tokenizer_type is None:
        if not args.tokenizer:
            raise InputError("--tokenizer is required (or Megatron-LM's --tokenizer-type with --tokenizer-model)")
        if args.json_keys and len(args.json_keys) > 1:
            raise InputError(f"--json-keys {' '.join(args.json_keys)}: one output per key needs Megatron-LM's naming "
                             "(--tokenizer-type with --tokenizer-model); otherwise name one key with --text-key")
        tokenize_corpus(args.input, args.output_prefix, args.tokenizer,
                        text_key=args.json_keys[0] if args.json_keys else args.text_key,
                        log_interval=args.log_interval, **common)
        return 0
    if args.tokenizer:
        raise InputError("--tokenizer and --tokenizer-type are two ways to say the same: give one "
                         "(--tokenizer-type with --tokenizer-model, as Megatron-LM's preprocess_data.py)")
    if not args.tokenizer_model:
        raise InputError(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
    for key in args.json_keys or ["text"]:  # Megatron-LM's output names: <prefix>_<key>_document
        tokenize_corpus(args.input, f"{args.output_prefix}_{key}_document", args.tokenizer_model, text_key=key,
                        append_eod=args.append_eod, **common)
    return 0
