"""The paper's comparison in miniature: an AR baseline, TiDAR from scratch, and the paper's recipe (the AR
checkpoint continued with the TiDAR objective at a lower learning rate), trained by the stack on the same
tokens and steps, then evaluated by the stack.

    python benchmarks/replicate.py                                  # CPU default: about 20 min on 2 cores
    python benchmarks/replicate.py --steps 4000 --layers 12 --hidden 768 --seq-length 1024 \\
        --block-size 16 --global-batch 64 --corpus-mb 64 --out runs/replicate-gpu   # on a GPU

Runs (each through the command line a user would type: `tidar-megatron train / export / evaluate`):
  ar            `tidar.objective: ar` for --steps steps
  tidar         the TiDAR objective from scratch for --steps steps
  ar+tidar      the ar run's checkpoint at step --steps - --continue-steps, continued with the TiDAR
                objective for --continue-steps steps at --continue-lr (init.from: weights only, fresh
                optimizer, 1% warm-up, as the paper continues Qwen checkpoints); same number of steps and
                tokens in all (its continuation re-reads the first samples of the corpus)
For each: held-out AR perplexity and diffusion loss (the interpreter's standard library files left out of
the corpus), greedy tokens per forward pass on held-out prompts, the greedy-identical fraction, AR vs
TiDAR tokens/s; and a plot of validation AR loss and estimated tokens per pass against steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sh(*args, log: Path | None = None):
    """Run `python -m tidar_megatron <args>`, its output teed to `log`; stop with its error on failure."""
    cmd = [sys.executable, "-m", "tidar_megatron", *map(str, args)]
    print("$ tidar-megatron " + " ".join(map(str, args)), flush=True)
    with open(log or os.devnull, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, args))}\n{tail}")


def prepare_data(out: Path, corpus_mb: float, vocab: int):
    from tidar_megatron.data.tokenize_corpus import tokenize_corpus
    from tidar_megatron.data.tokenizer import Tokenizer, train_sentencepiece
    from tidar_megatron.quickstart import heldout_prompts, stdlib_sources

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    files, heldout = stdlib_sources(corpus_mb), stdlib_sources(1.0, skip_mb=corpus_mb)
    tok = data / "tokenizer.model"
    if not tok.exists():
        train_sentencepiece((Path(f).read_text(encoding="utf-8", errors="replace") for f in files), str(tok),
                            vocab_size=vocab)
    for inputs, prefix in ((files, data / "corpus"), (heldout, data / "heldout")):
        if not Path(f"{prefix}.idx").exists():
            tokenize_corpus(inputs, str(prefix), str(tok), workers=2, progress=False)
    prompts = data / "prompts.jsonl"
    tokenizer = Tokenizer(str(tok))
    rows = [{"prompt_ids": ids} for ids in heldout_prompts(heldout, tokenizer, 16, 64)[1:]]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tok, data / "corpus", data / "heldout", prompts, len(files), len(heldout)


def validation_curve(run_dir: Path) -> list[dict]:
    """The validation lines of a run's train.log: [{"step": N, metric: value}, ...]."""
    points = []
    for line in (run_dir / "train.log").read_text().splitlines():
        match = re.match(r"step (\d+) validation: (\{.*\})$", line)
        if match:
            points.append({"step": int(match[1]), **json.loads(match[2])})
    return points


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/replicate")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--continue-steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--continue-lr", type=float, default=5e-4, help="the paper continues at 1e-5 peak, about a "
                   "30th of a from-scratch rate; a smaller step here, as the model is small and undertrained")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--corpus-mb", type=float, default=4.0)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu", help="evaluation device (training uses CUDA when present)")
    args = p.parse_args(argv)
    from tidar_megatron import console

    console.setup()
    out = Path(args.out)
    started = time.time()
    tok, corpus, heldout, prompts, n_files, n_heldout = prepare_data(out, args.corpus_mb, args.vocab)
    model = ["--model.num_layers", args.layers, "--model.hidden_size", args.hidden,
             "--model.num_attention_heads", args.heads, "--model.num_query_groups", max(args.heads // 2, 1),
             "--model.ffn_hidden_size", 3 * args.hidden, "--tidar.draft_block_size", args.block_size]
    common = ["--config", "tiny", *model, "--data.blend", corpus, "--data.tokenizer", tok, "--data.split", "98,2,0",
              "--train.seq_length", args.seq_length, "--train.global_batch_size", args.global_batch,
              "--train.micro_batch_size", args.micro_batch, "--train.eval_interval", max(args.steps // 12, 1),
              "--train.eval_iters", 4, "--train.log_interval", 50, "--log.wandb_mode", "disabled",
              "--parallel.use_distributed_optimizer", "false"]
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
    seconds = {}
    for name, extra in runs.items():
        run_dir = out / name
        t0 = time.time()
        if not (run_dir / "latest").exists() or not (out / f"{name}.done").exists():
            sh("train", *common, *extra, "--checkpoint.dir", run_dir, log=out / f"{name}.train.log")
            (out / f"{name}.done").write_text("")
        seconds[name] = time.time() - t0
        hf = out / f"{name}-hf"
        if not (hf / "config.json").exists():
            sh("export", "--checkpoint", run_dir, "--output", hf, "--tokenizer", tok, "--force")
        sh("evaluate", "--model", hf, "--data", heldout, "--seq-length", args.seq_length, "--prompts", prompts,
           "--max-new-tokens", args.max_new_tokens, "--block-size", args.block_size, "--device", args.device,
           "--output", out / f"{name}-eval" / "results.json", "--quiet", log=out / f"{name}.eval.log")
    results = {name: json.loads((out / f"{name}-eval" / "results.json").read_text()) for name in runs}
    curves = {name: validation_curve(out / name) for name in runs}
    split_shift = {"ar+tidar": split}  # its steps continue the ar run's
    curves = {n: [dict(p, step=p["step"] + split_shift.get(n, 0)) for p in c] for n, c in curves.items()}
    curves["ar+tidar"] = [p for p in curves["ar"] if p["step"] <= split] + curves["ar+tidar"]
    plot = draw(curves, out / "replicate.png")
    rows = []
    for name, r in results.items():
        t = r["generation"]["tidar"][str(args.block_size)]
        rows.append(f"| {name} | {r['ar_perplexity']:.2f} | {r['likelihood'].get('diff_loss', float('nan')):.3f} | "
                    f"{t['tokens_per_pass']:.2f} | {t['greedy_identical_fraction']:.0%} | "
                    f"{r['generation']['ar']['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {t['speedup_vs_ar']:.2f}x "
                    f"| {curves[name][-1].get('est_tokens_per_pass', float('nan')):.2f} |")
    table = ("| run | held-out AR perplexity | diffusion loss | greedy tokens/pass | greedy = AR | AR tok/s | "
             "TiDAR tok/s | TiDAR / AR | est. tokens/pass (validation) |\n|" + " --- |" * 9 + "\n" + "\n".join(rows))
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "corpus_files": n_files,
               "heldout_files": n_heldout, "train_seconds": seconds, "total_seconds": time.time() - started,
               "device": results["ar"]["device"], "date": results["ar"]["date"], "results": results,
               "table": table, "plot": str(plot)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{table}\n\nplot: {plot}; {time.time() - started:.0f}s in all; summary {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
