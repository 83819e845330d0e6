"""The paper's comparison in miniature: an AR baseline, TiDAR from scratch, and the paper's recipe (the AR
checkpoint continued with the TiDAR objective at a lower learning rate), trained by the stack on the same
tokens and steps, then evaluated by the stack.

    python benchmarks/replicate.py                      # CPU default: about 20 min on 2 cores
    bash benchmarks/gpu_suite.sh --stages replication   # at GPU scale (its command line: gpu_suite.py)

Runs (--runs picks some; each through the command line a user would type: `tidar-megatron train / export /
evaluate`):
  ar            `tidar.objective: ar` for --steps steps
  tidar         the TiDAR objective from scratch for --steps steps
  ar+tidar      the ar run's checkpoint at step --steps - --continue-steps, continued with the TiDAR
                objective for --continue-steps steps at --continue-lr (init.from: weights only, fresh
                optimizer, 1% warm-up, as the paper continues Qwen checkpoints); same number of steps and
                tokens in all (its continuation re-reads the first samples of the corpus)
Dotted config overrides after the flags (`--train.bf16 true --model.attention_backend kernel`) go to every
training run.

Data: this interpreter's own Python sources, tokenized here by the stack's tokenizer trainer and tokenizer:
the standard library, continued into its site-packages when --corpus-mb asks for more; held out (never
trained on): the --heldout-mb of standard-library files after the training part of it.
For each run: held-out AR perplexity and diffusion loss, then (--decode) greedy tokens per forward pass on
held-out prompts at each --decode-block-sizes, the greedy-identical fraction, AR vs TiDAR tokens/s at batch 1
in one run, and the repetition of the generated text where `evaluate` reports it; a plot of validation AR
loss and estimated tokens per pass against steps.  summary.json is rewritten after every run, so an
interrupted replication keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

RUNS = ("ar", "tidar", "ar+tidar")


def sh(*args, log: Path | None = None):
    """Run `python -m tidar_megatron <args>`, its output teed to `log`; stop with its error on failure."""
    cmd = [sys.executable, "-m", "tidar_megatron", *map(str, args)]
    print("$ tidar-megatron " + " ".join(map(str, args)), flush=True)
    with open(log or os.devnull, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, args))}\n{tail}")


def corpus_files(corpus_mb: float, heldout_mb: float, stdlib: Path | None = None,
                 site: list[Path] | None = None) -> tuple[list[str], list[str]]:
    """(training files, held-out files) from the interpreter's own sources: the standard library first, held
    out the `heldout_mb` of it after the training part; a corpus larger than the rest of the standard library
    continues into the site-packages folders on sys.path (files over 256 KB, mostly generated tables, left
    out)."""
    from tidar_megatron.quickstart import python_sources

    stdlib = stdlib or Path(sysconfig.get_paths()["stdlib"])
    stdlib_mb = sum(os.path.getsize(f) for f in python_sources(stdlib, math.inf)) / 2**20
    from_stdlib = max(min(corpus_mb, stdlib_mb - heldout_mb), 0.0)
    train, heldout = python_sources(stdlib, from_stdlib), python_sources(stdlib, heldout_mb, skip_mb=from_stdlib)
    if corpus_mb > from_stdlib:
        roots = site or list(dict.fromkeys(Path(p) for p in sys.path if Path(p).name in ("site-packages",
                                                                                           "dist-packages")))
        rest = corpus_mb - from_stdlib
        for root in roots:
            files = python_sources(root, rest, max_file_kb=256)
            train += files
            rest -= sum(os.path.getsize(f) for f in files) / 2**20
    return train, heldout


def prepare_data(out: Path, args) -> dict:
    """Tokenizer, tokenized corpus and held-out data, prompts; reused when present."""
    from tidar_megatron.data.tokenize_corpus import tokenize_corpus
    from tidar_megatron.data.tokenizer import Tokenizer, train_sentencepiece
    from tidar_megatron.quickstart import heldout_prompts

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    stats_path = data / "stats.json"
    if stats_path.exists():
        return json.loads(stats_path.read_text())
    t0 = time.time()
    files, heldout = corpus_files(args.corpus_mb, args.heldout_mb)
    if not files or not heldout:
        missing = "held-out files within --heldout-mb" if files else "training files within --corpus-mb"
        raise SystemExit(f"{out}: no {missing} ({args.corpus_mb} / {args.heldout_mb} MB); raise it")
    tok = data / "tokenizer.model"
    train_sentencepiece((Path(f).read_text(encoding="utf-8", errors="replace") for f in files), str(tok),
                        vocab_size=args.vocab, max_sentences=args.tokenizer_lines)
    t_tok = time.time()
    tokens = {}
    for inputs, name in ((files, "corpus"), (heldout, "heldout")):
        summary = tokenize_corpus(inputs, str(data / name), str(tok), workers=args.workers, overwrite=True,
                                  progress=False)
        tokens[name] = summary["tokens"]
    rows = [{"prompt_ids": ids} for ids in heldout_prompts(heldout, Tokenizer(str(tok)), args.prompts,
                                                           args.prompt_tokens)[1:]]
    (data / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    stats = {"tokenizer": str(tok), "corpus": str(data / "corpus"), "heldout": str(data / "heldout"),
             "prompts": str(data / "prompts.jsonl"), "prompt_count": len(rows), "corpus_files": len(files),
             "corpus_mb": sum(os.path.getsize(f) for f in files) / 2**20, "heldout_files": len(heldout),
             "corpus_tokens": tokens["corpus"], "heldout_tokens": tokens["heldout"],
             "seconds": {"tokenizer": t_tok - t0, "tokenize": time.time() - t_tok}}
    stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def validation_curve(run_dir: Path) -> list[dict]:
    """The validation lines of a run's train.log: [{"step": N, metric: value}, ...]."""
    points = []
    for line in (run_dir / "train.log").read_text().splitlines():
        match = re.match(r"step (\d+) validation: (\{.*\})$", line)
        if match:
            points.append({"step": int(match[1]), **json.loads(match[2])})
    return points


def parameter_count(hf_dir: Path) -> dict:
    """Parameters of an exported model: all, and the input embedding and output layer among them."""
    from safetensors import safe_open

    total = embedding = 0
    for file in hf_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                n = math.prod(f.get_slice(name).get_shape())
                total += n
                embedding += n if ("embed_tokens" in name or "lm_head" in name) else 0
    return {"total": total, "embedding": embedding}


def run_row(result: dict) -> dict:
    """The figures of one run's evaluation that the tables show (repetition where `evaluate` gives it)."""
    row = {k: result.get(k) for k in ("ar_perplexity", "tokens_scored")}
    row["diff_loss"] = result.get("likelihood", {}).get("diff_loss")
    generation = result.get("generation")
    if generation:
        row["ar"] = {k: generation["ar"].get(k) for k in ("tokens_per_s", "repetition")}
        row["tidar"] = {str(b): {k: r.get(k) for k in ("tokens_per_pass", "tokens_per_s", "speedup_vs_ar",
                                                       "greedy_identical_fraction", "repetition")}
                        for b, r in generation["tidar"].items()}
    return row


def repetition_text(repetition: dict | None) -> str:
    if not repetition:
        return "-"
    text = f"{repetition['loop_fraction']:.2f} / {repetition['distinct_2']:.2f}"
    return text + (" DEGENERATE" if repetition.get("degenerate") else "")


def table(rows: dict, curves: dict) -> str:
    """One line per run and decoding block size."""
    head = ("| run | block | held-out AR perplexity | diffusion loss | greedy tokens/pass | greedy = AR | AR tok/s | "
            "TiDAR tok/s | TiDAR / AR | loop fraction / distinct-2 (AR; TiDAR) | est. tokens/pass (validation) |")
    lines = [head, "|" + " --- |" * (head.count(" | ") + 1)]
    for name, row in rows.items():
        est = (curves.get(name) or [{}])[-1].get("est_tokens_per_pass")
        est = f"{est:.2f}" if est is not None else "-"
        diff = f"{row['diff_loss']:.3f}" if row["diff_loss"] is not None else "-"
        quality = f"{row['ar_perplexity']:.2f} | {diff}"
        blocks = row.get("tidar") or {"-": None}
        for block, t in blocks.items():
            if t is None:
                lines.append(f"| {name} | - | {quality} | - | - | - | - | - | - | {est} |")
                continue
            lines.append(f"| {name} | {block} | {quality} | {t['tokens_per_pass']:.2f} | "
                         f"{t['greedy_identical_fraction']:.0%} | {row['ar']['tokens_per_s']:.0f} | "
                         f"{t['tokens_per_s']:.0f} | {t['speedup_vs_ar']:.2f}x | "
                         f"{repetition_text(row['ar']['repetition'])}; {repetition_text(t['repetition'])} | {est} |")
    return "\n".join(lines)


def draw(curves: dict, path: Path):
    from tidar_megatron.plots import _pyplot, _save

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for i, (name, points) in enumerate(curves.items()):  # one colour per run in both panels
        left.plot([p["step"] for p in points], [p["loss_ar"] for p in points], marker="o", ms=3, label=name,
                  color=f"C{i}")
        est = [p for p in points if "est_tokens_per_pass" in p]
        if est:
            right.plot([p["step"] for p in est], [p["est_tokens_per_pass"] for p in est], marker="o", ms=3,
                       label=name, color=f"C{i}")
    left.set(xlabel="step (ar+tidar: steps of the whole run)", ylabel="validation AR loss (nats)")
    right.set(xlabel="step", ylabel="estimated greedy tokens per pass")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/replicate")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--continue-steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--continue-lr", type=float, default=5e-4, help="the paper continues at 1e-5 peak, about a "
                   "30th of a from-scratch rate; a smaller step here, as the model is small and undertrained")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--block-size", type=int, default=8, help="the draft block size trained with")
    p.add_argument("--decode-block-sizes", type=int, nargs="+", help="block sizes decoded with (default: "
                   "--block-size)")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--corpus-mb", type=float, default=4.0)
    p.add_argument("--heldout-mb", type=float, default=1.0)
    p.add_argument("--eval-iters", type=int, default=4, help="validation batches, every --steps / 12 steps")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--tokenizer-lines", type=int, default=2_000_000, help="lines the tokenizer trainer samples")
    p.add_argument("--workers", type=int, help="tokenizer processes (default: all cores)")
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--decode", choices=("all", "tidar"), default="all", help="runs whose decoding is measured: "
                   "all, or tidar: those trained with the TiDAR objective (the AR baseline's drafts are "
                   "untrained; the other runs' evaluations time AR decoding of the same shape)")
    p.add_argument("--device", default="cpu", help="evaluation device (training uses CUDA when present)")
    return p


def main(argv=None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    if "ar+tidar" in args.runs and "ar" not in args.runs:
        raise SystemExit("--runs ar+tidar continues the ar run's checkpoint: name ar too")
    if any(not o.startswith("--") or "." not in o for o in overrides[::2]):
        raise SystemExit(f"unknown arguments {overrides}: flags above, or dotted config overrides")
    from tidar_megatron import console

    console.setup()
    out = Path(args.out)
    started = time.time()
    data = prepare_data(out, args)
    print(f"data: {data['corpus_files']} files, {data['corpus_mb']:.1f} MB, {data['corpus_tokens']:,} tokens; "
          f"held out {data['heldout_files']} files, {data['heldout_tokens']:,} tokens; {data['seconds']}", flush=True)
    tok = data["tokenizer"]
    model = ["--model.num_layers", args.layers, "--model.hidden_size", args.hidden,
             "--model.num_attention_heads", args.heads, "--model.num_query_groups", max(args.heads // 2, 1),
             "--model.ffn_hidden_size", 3 * args.hidden, "--tidar.draft_block_size", args.block_size]
    common = ["--config", "tiny", *model, "--data.blend", data["corpus"], "--data.tokenizer", tok,
              "--data.split", "98,2,0", "--train.seq_length", args.seq_length, "--train.global_batch_size",
              args.global_batch, "--train.micro_batch_size", args.micro_batch, "--train.eval_interval",
              max(args.steps // 12, 1), "--train.eval_iters", args.eval_iters, "--train.log_interval", 50,
              "--log.wandb_mode", "disabled", *overrides]
    split = args.steps - args.continue_steps
    runs = {
        "ar": ["--tidar.objective", "ar", "--train.train_steps", args.steps, "--train.lr", args.lr,
               "--train.min_lr", args.lr / 10, "--train.lr_warmup_steps", args.steps // 20,
               "--checkpoint.interval", split, "--checkpoint.keep_last", 5],
        "tidar": ["--train.train_steps", args.steps, "--train.lr", args.lr, "--train.min_lr", args.lr / 10,
                  "--train.lr_warmup_steps", args.steps // 20],
        "ar+tidar": ["--train.train_steps", args.continue_steps, "--train.lr", args.continue_lr,
                     "--train.min_lr", args.continue_lr * 0.3, "--train.lr_warmup_steps",
                     max(args.continue_steps // 100, 1), "--checkpoint.init_from", out / "ar" / f"iter_{split:07d}"],
    }
    blocks = args.decode_block_sizes or [args.block_size]
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "overrides": list(map(str, overrides)),
               "data": data, "seconds": {"data": round(sum(data["seconds"].values()), 1)}, "runs": {}, "results": {}}
    for name in (n for n in RUNS if n in args.runs):
        run_dir, hf, seconds = out / name, out / f"{name}-hf", {}
        t0 = time.time()
        if not (run_dir / "latest").exists() or not (out / f"{name}.done").exists():
            sh("train", *common, *runs[name], "--checkpoint.dir", run_dir, log=out / f"{name}.train.log")
            (out / f"{name}.done").write_text("")
        seconds["train"] = time.time() - t0
        if not (hf / "config.json").exists():
            sh("export", "--checkpoint", run_dir, "--output", hf, "--tokenizer", tok, "--force")
        seconds["export"] = time.time() - t0 - seconds["train"]
        decode = ["--prompts", data["prompts"], "--max-new-tokens", args.max_new_tokens, "--block-size", *blocks]
        sh("evaluate", "--model", hf, "--data", data["heldout"], "--seq-length", args.seq_length,
           *(decode if args.decode == "all" or name != "ar" else []), "--device", args.device,
           "--output", out / f"{name}-eval" / "results.json", "--quiet", log=out / f"{name}.eval.log")
        seconds["evaluate"] = time.time() - t0 - seconds["train"] - seconds["export"]
        result = json.loads((out / f"{name}-eval" / "results.json").read_text())
        summary["results"][name] = result
        summary["runs"][name] = run_row(result)
        summary["seconds"][name] = {k: round(v, 1) for k, v in seconds.items()}
        summary.update(params=parameter_count(hf), device=result["device"], date=result["date"],
                       total_seconds=time.time() - started)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    curves = {name: validation_curve(out / name) for name in summary["runs"]}
    if "ar+tidar" in curves:  # its steps continue the ar run's
        curves["ar+tidar"] = ([p for p in curves["ar"] if p["step"] <= split]
                              + [dict(p, step=p["step"] + split) for p in curves["ar+tidar"]])
    summary.update(curves=curves, table=table(summary["runs"], curves), plot=str(draw(curves, out / "replicate.png")),
                   total_seconds=time.time() - started)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{summary['table']}\n\nplot: {summary['plot']}; {summary['total_seconds']:.0f}s in all "
          f"({json.dumps(summary['seconds'])}); summary {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
