"""`tidar-megatron evaluate`: TiDAR's promise measured on an exported model, the way the paper measures it.

    tidar-megatron evaluate --model <exported HF dir> --output results.json
        [--data <prefix> --seq-length N]                      likelihood (likelihood.py)
        [--prompts prompts.jsonl --max-new-tokens N]          TiDAR vs AR decoding (generation.py)
        [--block-size B [B ...]] [--beta BETA] [--device ...] [--dtype ...]

Writes `results.json` (top-level keys include ar_nll, ar_perplexity, tokens_scored, and for the first block
size tokens_per_pass, greedy_identical_fraction and speedup_vs_ar; every decoding report has `repetition`,
evaluation/repetition.py), a markdown table on stdout (also `results.md`) that says in words when a
tokens-per-pass figure comes from degenerate (looping) output, and `acceptance.png`: the acceptance histogram
per block size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from tidar_megatron.atomic import write_atomic
from tidar_megatron.console import ProgressBar, entry_point
from tidar_megatron.errors import TiDARError
from tidar_megatron.evaluation import generation, likelihood, repetition
from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.generate import DTYPES, check_exported, load_tokenizer, resolve_dtype
from tidar_megatron.plots import PlotsUnavailable, draw_acceptance



def evaluate(model_dir, output, data: str | None = None, seq_length: int | None = None, prompts: str | None = None,
             max_new_tokens: int = 128, block_sizes: list[int] | None = None, beta: float = 1.0,
             device: str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 8,
             progress: bool = True) -> dict:
    """Run the requested evaluations; returns the results dict (also written to `output`).  `seq_length`:
    default the model's context, at most 1024; a longer one is clamped to the context, and said."""
    if data is None and prompts is None:
        raise TiDARError("nothing to evaluate: give --data (likelihood) and/or --prompts (decoding)")
    output = Path(output)
    check_exported(model_dir)
    decoder = Decoder.from_pretrained(model_dir, dtype, device, beta=beta)
    block_sizes = block_sizes or ([decoder.block_size] if decoder.block_size else [])
    if not block_sizes:
        raise TiDARError(f"{model_dir}: config.json has no tidar_draft_block_size; pass --block-size")
    results = {"model": str(model_dir), "date": datetime.date.today().isoformat(), "device": _device_name(device),
               "dtype": str(dtype).removeprefix("torch."), "block_sizes": block_sizes, "beta": beta}
    if data is not None:
        positions = decoder.max_positions or 1024
        if seq_length is not None and seq_length > positions:  # the context rule (inference/step.py)
            print(f"--seq-length {seq_length} is past the model's context of {positions} positions "
                  f"(max_position_embeddings): scoring windows of {positions} tokens", file=sys.stderr)
        seq_length = min(seq_length or 1024, positions)
        documents = likelihood.read_documents(data, decoder.model.args.vocab_size,
                                              _tokenizer_or_none(model_dir))
        scored = likelihood.score(decoder.model, documents, seq_length, block_sizes[0], decoder.mask_token_id,
                                  batch_size, ProgressBar("likelihood", " windows", progress))
        results.update(data=str(data), seq_length=seq_length, likelihood=scored,
                       **{k: scored[k] for k in ("ar_nll", "ar_perplexity", "tokens_scored")})
    if prompts is not None:
        tokenizer = _tokenizer_or_none(model_dir)
        parsed = generation.read_prompts(prompts, tokenizer)
        report = generation.compare(decoder, parsed, tokenizer, max_new_tokens, block_sizes, beta,
                                    progress=ProgressBar("decoding", " prompts", progress))
        first = report["tidar"][block_sizes[0]]
        results.update(prompts=str(prompts), generation=report,
                       **{k: first[k] for k in ("tokens_per_pass", "greedy_identical_fraction", "speedup_vs_ar")})
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    write_atomic(output.with_suffix(".md"), table + "\n")
    if prompts is not None:
        try:
            results["plot"] = str(draw_acceptance(results["generation"]["tidar"], output.parent / "acceptance.png"))
        except PlotsUnavailable as e:
            print(e, file=sys.stderr)
    return results


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _tokenizer_or_none(model_dir):
    try:
        return load_tokenizer(Path(model_dir))
    except TiDARError:
        return None  # token-id prompts still work; text prompts then say so


def markdown(results: dict) -> str:
    lines = [f"Evaluation of {results['model']} ({results['device']}, {results['date']}, beta {results['beta']})", ""]
    if "likelihood" in results:
        lk = results["likelihood"]
        lines += ["| AR NLL | AR perplexity | tokens scored | diffusion loss | draft accuracy (offset 0 / 1 / last) |",
                  "| --- | --- | --- | --- | --- |"]
        acc = lk.get("draft_accuracy")
        acc_text = f"{acc[0]:.3f} / {acc[1]:.3f} / {acc[-1]:.3f}" if acc and len(acc) > 1 else "-"
        diff = f"{lk['diff_loss']:.4f}" if "diff_loss" in lk else "-"
        lines += [f"| {lk['ar_nll']:.4f} | {lk['ar_perplexity']:.2f} | {lk['tokens_scored']:,} | {diff} | {acc_text} |",
                  ""]
    if "generation" in results:
        gen = results["generation"]
        ar = gen["ar"]
        extra = [k for k in ("exact_match", "pass@1") if k in ar]
        header = ["mode", "block", "tokens per pass", "tokens/s", "vs AR", "greedy = AR", "loop fraction",
                  "distinct-1 / -2", *extra]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        rows = [["AR", "-", f"{ar['tokens_per_pass']:.2f}", f"{ar['tokens_per_s']:.1f}", "1.00x", "-",
                 *_repetition_cells(ar)] + [f"{ar[k]:.3f}" for k in extra]]
        notes = []  # plain words for every tokens-per-pass figure that comes from degenerate output
        for b, r in gen["tidar"].items():
            rows.append(["TiDAR", str(b), f"{r['tokens_per_pass']:.2f}", f"{r['tokens_per_s']:.1f}",
                         f"{r['speedup_vs_ar']:.2f}x", f"{r['greedy_identical_fraction']:.0%}",
                         *_repetition_cells(r)] + [f"{r[k]:.3f}" for k in extra])
            if note := repetition.degenerate_note(r["repetition"], r["tokens_per_pass"], f"TiDAR block {b}"):
                notes.append(f"**Degenerate output.** {note}")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", *notes] if notes else []
    return "\n".join(lines)


def _repetition_cells(report: dict) -> list[str]:
    rep = report["repetition"]
    return [f"{rep['loop_fraction']:.0%}" + (" (degenerate)" if rep["degenerate"] else ""),
            f"{rep['distinct_1']:.2f} / {rep['distinct_2']:.2f}"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidar-megatron evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="exported Hugging Face directory")
    p.add_argument("--output", required=True, help="results JSON to write (results.md and acceptance.png beside it)")
    p.add_argument("--data", help="a tokenized .bin/.idx prefix: AR likelihood, diffusion loss, draft accuracy")
    p.add_argument("--seq-length", type=int, help="window length for --data (default: the model's context, at "
                   "most 1024; longer is clamped to it, and said)")
    p.add_argument("--prompts", help="JSONL prompts: TiDAR vs AR decoding (see tidar_megatron/evaluation/generation.py)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, nargs="+", help="draft block sizes to decode with (default: the "
                   "checkpoint's tidar_draft_block_size)")
    p.add_argument("--beta", type=float, default=1.0, help="1 = trust AR (lossless), 0 = trust the drafts")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass for --data")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@entry_point("tidar-megatron evaluate")
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if (a.seq_length is not None and a.seq_length < 2) or a.max_new_tokens < 1 or any(b < 2 for b in a.block_size or []):
        raise TiDARError("--seq-length must be >= 2, --max-new-tokens >= 1 and every --block-size >= 2")
    dtype = resolve_dtype(a.dtype, a.device)
    results = evaluate(a.model, a.output, a.data, a.seq_length, a.prompts, a.max_new_tokens, a.block_size, a.beta,
                       a.device, dtype, a.batch_size, progress=not a.quiet)
    print(markdown(results))
    print(f"\nwrote {a.output}" + (f" and {results['plot']}" if "plot" in results else ""))
    return 0
