"""Tokenization throughput: ours (`data_prep/tokenize.py`) vs Megatron-LM's `tools/preprocess_data.py`.

Both run as separate processes, end to end (start-up, tokenization, writing .bin/.idx), with the same
command line (Megatron-LM's flags, which ours accepts unchanged) on the same JSONL input, SentencePiece
model and number of workers; the outputs must hold the same token ids and document boundaries.  Megatron-LM's script is not part of this repository and is never
committed: pass its path with --megatron-script or MEGATRON_PREPROCESS, e.g. from a Megatron-LM checkout
matching the installed megatron-core (0.19):

    git -C Megatron-LM show core_v0.19.0:tools/preprocess_data.py > /tmp/scratch/preprocess_data.py
    python benchmarks/tokenize_throughput.py --megatron-script /tmp/scratch/preprocess_data.py

Input: distinct Python sources of the running interpreter (stdlib, then site-packages) as JSONL, up to
--input-mb.  Each tool runs --repeats times, alternating, and the best time counts (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_input(path: Path, target_mb: float) -> tuple[int, int]:
    """Distinct Python sources (the interpreter's standard library, then its site-packages) as
    {"text": ...} lines up to ~target_mb; returns (documents, bytes).  Never repeated, so a tokenizer's
    cache gets no more help than real code gives it."""
    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    seen, docs, size = set(), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        for root in roots:
            for p in sorted(Path(root).rglob("*.py"), key=str):
                try:
                    t = p.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                # Skipped: empty documents (Megatron drops them, we count them as errors) and texts with a
                # literal U+2581, which Megatron's SentencePiece tokenizer turns into ' ' and we keep.
                if not t.strip() or "\u2581" in t or t in seen:
                    continue
                seen.add(t)
                line = json.dumps({"text": t}) + "\n"
                f.write(line)
                docs, size = docs + 1, size + len(line.encode())
                if size >= target_mb * 1e6:
                    return docs, size
    return docs, size


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return dt


def read_ids(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix)
    # Copies: the arrays are views of memory maps that close with `ds`.
    tokens = np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)
    return tokens, np.array(ds.sequence_lengths), np.array(ds.document_indices)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megatron-script", default=os.environ.get("MEGATRON_PREPROCESS"),
                    help="path to Megatron-LM's tools/preprocess_data.py (or env MEGATRON_PREPROCESS)")
    ap.add_argument("--input-mb", type=float, default=100)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--chunk-mb", type=float, default=16, help="our shard size")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scratch", default=None, help="working directory (default: a temporary one)")
    args = ap.parse_args(argv)
    if not args.megatron_script or not Path(args.megatron_script).is_file():
        sys.exit("Megatron-LM's tools/preprocess_data.py is needed: pass --megatron-script PATH (see the "
                 "module docstring for how to get it)")

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="tok_bench_"))
    scratch.mkdir(parents=True, exist_ok=True)
    data = scratch / "input.jsonl"
    docs, size = make_input(data, args.input_mb)
    model = scratch / "sp.model"
    subprocess.run([sys.executable, str(REPO / "data_prep" / "train_tokenizer.py"), "--input", str(data),
                    "--output", str(model), "--vocab-size", str(args.vocab_size), "--sample-mb", "20",
                    "--max-sentences", "300000"], check=True, capture_output=True)

    ours_prefix, theirs_prefix = scratch / "ours", scratch / "megatron"

    def command_line(prefix):  # Megatron-LM's flags, for both tools
        return ["--input", str(data), "--output-prefix", str(prefix), "--tokenizer-type", "SentencePieceTokenizer",
                "--tokenizer-model", str(model), "--json-keys", "text", "--append-eod", "--workers",
                str(args.workers), "--log-interval", "100000"]

    ours_cmd = [sys.executable, str(REPO / "data_prep" / "tokenize.py"), *command_line(ours_prefix), "--overwrite",
                "--quiet", "--chunk-mb", str(args.chunk_mb)]
    theirs_cmd = [sys.executable, args.megatron_script, *command_line(theirs_prefix)]
    times = {"ours": [], "theirs": []}
    for _ in range(args.repeats):
        times["theirs"].append(timed(theirs_cmd, scratch))
        times["ours"].append(timed(ours_cmd, scratch))
    t_ours, t_theirs = min(times["ours"]), min(times["theirs"])

    ours = read_ids(f"{ours_prefix}_text_document")
    theirs = read_ids(f"{theirs_prefix}_text_document")
    same = all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    n_tokens = len(ours[0])
    print(f"device: CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"input: {docs:,} documents, {size / 1e6:.1f} MB JSONL; {n_tokens:,} tokens; vocab {args.vocab_size}; "
          f"workers {args.workers}")
    print(f"{'tool':<28}{'seconds':>10}{'tokens/s':>14}{'MB/s':>8}")
    for name, dt in (("ours (data_prep/tokenize.py)", t_ours), ("Megatron-LM preprocess_data", t_theirs)):
        print(f"{name:<28}{dt:>10.2f}{n_tokens / dt:>14,.0f}{size / dt / 1e6:>8.2f}")
    print(f"all runs (s): ours {times['ours']}, Megatron-LM {times['theirs']}")
    print(f"speed-up: {t_theirs / t_ours:.2f}x; identical token ids and document boundaries: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
