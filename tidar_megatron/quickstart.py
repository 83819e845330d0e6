"""`make quickstart`: the whole pipeline on the embedded default, on a CPU, in a few minutes.

1. train a code tokenizer on the Python standard library of this interpreter (the embedded corpus),
2. tokenize that corpus to Megatron .bin/.idx,
3. train the `tiny` TiDAR model with Megatron-core on the CPU (gloo), with progress, and save a checkpoint,
4. export it to a Hugging Face directory and complete a prompt with TiDAR decoding (tokens per pass).
Each stage is skipped when its output already exists, so a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
import sysconfig
import time
from pathlib import Path

from .config import load_config

PROMPT = "def fibonacci(n):\n    "


def stdlib_sources(limit_mb: float) -> list[str]:
    """Python files of the running interpreter's standard library, in a stable order, up to limit_mb."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        size = path.stat().st_size
        if total + size > limit_mb * 2**20:
            break
        files.append(str(path))
        total += size
    return files


def run(out: Path, steps: int, corpus_mb: float, vocab_size: int, seq_length: int, decode: bool = True) -> dict:
    from .data.tokenize_corpus import tokenize_corpus
    from .data.tokenizer import Tokenizer, train_sentencepiece

    out.mkdir(parents=True, exist_ok=True)
    files = stdlib_sources(corpus_mb)
    print(f"[1/4] corpus: {len(files)} standard-library files from {Path(files[0]).parent}", flush=True)
    tok_path = out / "tokenizer.model"
    if not tok_path.exists():
        texts = (Path(f).read_text(encoding="utf-8", errors="replace") for f in files)
        train_sentencepiece(texts, str(tok_path), vocab_size=vocab_size)
    tokenizer = Tokenizer(str(tok_path))
    print(f"      tokenizer: {tok_path} ({tokenizer.vocab_size} tokens)", flush=True)

    prefix = out / "data" / "stdlib"
    if not Path(f"{prefix}.idx").exists():
        print("[2/4] tokenizing", flush=True)
        tokenize_corpus(files, str(prefix), str(tok_path), workers=2, chunk_mb=1)
    print(f"[2/4] data: {prefix}.bin/.idx", flush=True)

    print(f"[3/4] training tiny TiDAR for {steps} steps on the CPU", flush=True)
    cfg = load_config("tiny", [
        "--model.vocab_size", str(tokenizer.vocab_size), "--tidar.mask_token_id", str(tokenizer.mask_id),
        "--data.blend", str(prefix), "--data.tokenizer", str(tok_path), "--data.split", "98,2,0",
        "--train.seq_length", str(seq_length), "--train.train_steps", str(steps),
        "--train.eval_interval", str(max(steps // 2, 1)), "--train.eval_iters", "2",
        "--train.lr_warmup_steps", str(min(20, steps // 10)),
        "--checkpoint.dir", str(out / "checkpoints"), "--log.wandb_mode", "disabled"])
    from .train import train

    t0 = time.time()
    metrics = train(cfg)
    print(f"      trained in {time.time() - t0:.0f}s: loss_ar {metrics.get('loss_ar', float('nan')):.3f}, "
          f"loss_diff {metrics.get('loss_diff', float('nan')):.3f}; loss curve {out / 'checkpoints' / 'loss.png'}",
          flush=True)
    result = {"train": metrics, "checkpoint": out / "checkpoints"}
    if decode:
        result["decode"] = export_and_generate(out, tok_path)
    return result


def export_and_generate(out: Path, tok_path: Path):
    try:
        from . import convert
        from .inference import generate
    except ImportError as e:
        print(f"[4/4] skipped: export/decoding not available ({e})", flush=True)
        return None
    hf_dir = out / "hf"
    print(f"[4/4] exporting to {hf_dir} and decoding", flush=True)
    convert.export(out / "checkpoints", hf_dir, tokenizer=str(tok_path), force=True)
    return generate.main(["--model", str(hf_dir), "--prompt", PROMPT, "--max-new-tokens", "48"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidar-megatron quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--corpus-mb", type=float, default=4.0)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seq-length", type=int, default=128)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines drown the progress
    from . import distributed

    try:
        run(Path(args.out), args.steps, args.corpus_mb, args.vocab_size, args.seq_length)
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
