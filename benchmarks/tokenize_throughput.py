"""Tokenization throughput: ours (`data_prep/tokenize.py`) on JSONL and on Parquet, and Megatron-LM's
`tools/preprocess_data.py` on the JSONL.

All run as separate processes, end to end (start-up, tokenization, writing .bin/.idx), on the same
documents, SentencePiece model and number of workers, with Megatron-LM's command line (which ours accepts
unchanged); every output must hold the same token ids and document boundaries.  The Parquet copy holds the
JSONL's documents in row groups of --rows-per-group rows (pyarrow's default compression, snappy), as
FineWeb-style corpora ship.  Megatron-LM's script is not part of this repository and is never committed:
pass its path with --megatron-script or MEGATRON_PREPROCESS to include it, e.g. from a Megatron-LM
checkout matching the installed megatron-core (0.19):

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


def write_parquet(jsonl: Path, path: Path, rows_per_group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in jsonl.read_text(encoding="utf-8").splitlines()]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=rows_per_group)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megatron-script", default=os.environ.get("MEGATRON_PREPROCESS"),
                    help="path to Megatron-LM's tools/preprocess_data.py (or env MEGATRON_PREPROCESS): compared too")
    ap.add_argument("--input-mb", type=float, default=100)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--chunk-mb", type=float, default=16, help="our shard size")
    ap.add_argument("--rows-per-group", type=int, default=256, help="Parquet row group size (documents)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scratch", default=None, help="working directory (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.megatron_script and not Path(args.megatron_script).is_file():
        sys.exit(f"--megatron-script {args.megatron_script}: not found (see the module docstring for how to get it)")

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="tok_bench_"))
    scratch.mkdir(parents=True, exist_ok=True)
    data = scratch / "input.jsonl"
    docs, size = make_input(data, args.input_mb)
    parquet = scratch / "input.parquet"
    write_parquet(data, parquet, args.rows_per_group)
    model = scratch / "sp.model"
    subprocess.run([sys.executable, str(REPO / "data_prep" / "train_tokenizer.py"), "--input", str(data),
                    "--output", str(model), "--vocab-size", str(args.vocab_size), "--sample-mb", "20",
                    "--max-sentences", "300000"], check=True, capture_output=True)

    def command_line(source, prefix):  # Megatron-LM's flags, for every tool
        return ["--input", str(source), "--output-prefix", str(prefix), "--tokenizer-type", "SentencePieceTokenizer",
                "--tokenizer-model", str(model), "--json-keys", "text", "--append-eod", "--workers",
                str(args.workers), "--log-interval", "100000"]

    ours = [sys.executable, str(REPO / "data_prep" / "tokenize.py")]
    ours_flags = ["--overwrite", "--quiet", "--chunk-mb", str(args.chunk_mb)]
    runs = {"ours, JSONL": ([*ours, *command_line(data, scratch / "jsonl"), *ours_flags], scratch / "jsonl"),
            "ours, Parquet": ([*ours, *command_line(parquet, scratch / "parquet"), *ours_flags], scratch / "parquet")}
    if args.megatron_script:
        runs["Megatron-LM, JSONL"] = ([sys.executable, args.megatron_script, *command_line(data, scratch / "megatron")],
                                      scratch / "megatron")
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (cmd, _) in runs.items():
            times[name].append(timed(cmd, scratch))
    best = {name: min(t) for name, t in times.items()}

    ids = {name: read_ids(f"{prefix}_text_document") for name, (_, prefix) in runs.items()}
    reference = ids["ours, JSONL"]
    same = {name: all(np.array_equal(a, b) for a, b in zip(reference, got)) for name, got in ids.items()}
    n_tokens = len(reference[0])
    print(f"device: CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"input: {docs:,} documents, {size / 1e6:.1f} MB JSONL, {parquet.stat().st_size / 1e6:.1f} MB Parquet "
          f"({args.rows_per_group} rows per row group); {n_tokens:,} tokens; vocab {args.vocab_size}; "
          f"workers {args.workers}")
    print(f"{'tool':<22}{'seconds':>10}{'tokens/s':>14}{'vs ours, JSONL':>16}  same ids")
    for name, dt in best.items():
        print(f"{name:<22}{dt:>10.2f}{n_tokens / dt:>14,.0f}{best['ours, JSONL'] / dt:>15.2f}x  {same[name]}")
    print("all runs (s): " + "; ".join(f"{name} {t}" for name, t in times.items()))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
