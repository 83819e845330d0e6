"""Every figure only a GPU can give, in one short run: `bash benchmarks/gpu_suite.sh [--out DIR] [--dry-run]`.

Stages in the order of what they are worth if the window closes early, each a subprocess with its own time
budget (a stage that fails or runs out of time is recorded, its processes stopped, and the next one runs):

  1. environment   GPU, driver, versions found, what was installed from the carried wheels       20 s
  2. decoding step one AR pass against one TiDAR pass (16 + 256 queries) at a 4096-token prefix, batch 1,
                   with SDPA, the kernel and torch.compile                                          60 s
  3. replication   benchmarks/replicate.py at GPU scale on the node's own Python sources: the AR
                   baseline, then the paper's recipe (the AR checkpoint continued with the TiDAR
                   objective) on the same tokens, bf16, kernel backend; `evaluate` on held-out files:
                   AR perplexity of both, greedy T/NFE at B = 4 / 8 / 16, TiDAR and AR tokens/s at
                   batch 1, greedy-identical fraction, repetition of the generated text            240 s
  4. training step TiDAR vs AR of the same model on the same clean tokens at the 1p5b shape (--layers of
                   its 28 layers), bf16, the kernel backend and the fused loss: step ratio, MFU, peak
                   memory                                                                           80 s
  5. attention     the TiDAR kernel against compiled FlexAttention, SDPA and TE, forward and forward +
                   backward, the 1p5b and 8b head shapes, L = 2048 / 4096 / 8192, block 16         90 s
  6. gpu tests     `pytest -m gpu`: bf16 backend parity, the kernel against SDPA, the fused loss      70 s

560 s of stages, so the whole suite with the wheel install fits one 10-minute command.  After every stage
DIR/results.json, DIR/results.md (the figures against their targets) and, with --bundle FILE, a .tar.gz of
them, the logs and the plots are rewritten: a window that closes early keeps what finished.
`--dry-run` runs every stage at toy sizes on the CPU (kernels in Triton's interpreter) through the same
programs and writes the same files; the test suite runs it.  The replication stage's sizes and their
arithmetic: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from replicate import repetition_text  # benchmarks/, this script's folder

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"attention fwd+bwd vs Flex": ">= 1.3x", "training step TiDAR / AR": "<= 2.05x (FLOP floor ~2.0x)",
           "training MFU": ">= 45%", "decoding pass TiDAR / AR": "<= 1.4x",
           "perplexity": "recipe within 2% of AR's", "tokens per pass": ">= 2.5 at B=8",
           "speed": "TiDAR tokens/s above AR's at batch 1"}
BUDGETS = {"environment": 20, "decoding step": 60, "replication": 240, "training step": 80, "attention": 90,
           "gpu tests": 70}
# The figures a stage writes: the key they take in results.json, and the file (under --out).
STAGE_RESULTS = {"environment": ("environment", "environment.json"), "decoding step": ("decoding", "decoding.json"),
                 "replication": ("replication", "replication/summary.json"),
                 "training step": ("training", "training.json"), "attention": ("attention", "attention.json")}
VERSIONS = ("torch", "triton", "transformers", "megatron-core", "transformer-engine", "numpy", "sentencepiece",
            "safetensors", "tokenizers", "pyyaml", "matplotlib", "psutil")
KILL_GRACE_S = 3
DRY_RUN_SLACK = 5  # the dry run's budgets: the GPU's times this, as the interpreter and a shared CPU are slow

# benchmarks/replicate.py in the replication stage: the same flags in both modes, sizes per mode.
REPLICATION = ["--runs", "ar", "ar+tidar", "--decode", "tidar", "--block-size", "16", "--decode-block-sizes", "4",
               "8", "16", "--train.bf16", "true", "--model.attention_backend", "kernel", "--model.fused_loss", "true"]
REPLICATION_SIZES = {
    # 12 x 512 (46M parameters), 600 AR steps of 32 x 1024 tokens (19.7M) from 64 MB of the node's Python
    # sources, the recipe continuing step 400 for 200 TiDAR steps: ~200 s planned of 240 (docs/benchmarks.md).
    "gpu": ["--steps", "600", "--continue-steps", "200", "--lr", "1e-3", "--continue-lr", "3e-4", "--layers", "12",
            "--hidden", "512", "--heads", "8", "--seq-length", "1024", "--global-batch", "32", "--micro-batch", "32",
            "--corpus-mb", "64", "--heldout-mb", "1", "--vocab", "8192", "--tokenizer-lines", "1000000",
            "--prompts", "16", "--prompt-tokens", "64", "--max-new-tokens", "128", "--device", "cuda"],
    "dry": ["--steps", "4", "--continue-steps", "2", "--layers", "2", "--hidden", "64", "--heads", "4",
            "--seq-length", "32", "--global-batch", "2", "--micro-batch", "2", "--corpus-mb", "0.49",
            "--heldout-mb", "0.035", "--vocab", "512", "--tokenizer-lines", "20000", "--prompts", "2",
            "--prompt-tokens", "16", "--max-new-tokens", "8", "--eval-iters", "1", "--workers", "2",
            "--device", "cpu", "--data.split", "80,20,0"],
}


def stages(out: Path, dry: bool, layers: int) -> list[tuple[str, int, list[str]]]:
    """(name, seconds allowed, command) of each stage in running order; the dry run's are the same programs
    at toy sizes."""
    py = sys.executable
    replication = [py, "benchmarks/replicate.py", "--out", str(out / "replication"), *REPLICATION,
                   *REPLICATION_SIZES["dry" if dry else "gpu"]]
    if dry:
        attention = [py, "benchmarks/attention.py", "--smoke", "--json", str(out / "attention.json")]
        step = [py, "benchmarks/step_time.py", "--config", "tiny", "--steps", "2", "--warmup", "1",
                "--model.attention_backend", "kernel", "--model.fused_loss", "true", "--train.seq_length", "32",
                "--tidar.draft_block_size", "4", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
                "--json", str(out / "training.json")]
        decode = [py, "benchmarks/decode_step.py", "--dry-run", "--json", str(out / "decoding.json")]
        tests = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    else:
        attention = [py, "benchmarks/attention.py", "--json", str(out / "attention.json")]
        step = [py, "benchmarks/step_time.py", "--config", "1p5b", "--steps", "6", "--warmup", "2",
                "--model.num_layers", str(layers), "--train.global_batch_size", "4", "--train.micro_batch_size",
                "1", "--json", str(out / "training.json")]
        decode = [py, "benchmarks/decode_step.py", "--json", str(out / "decoding.json")]
        # A test module that cannot be imported on the node (a missing optional package) must not cost the rest.
        tests = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                 "tests/"]
    env = [py, "benchmarks/gpu_suite.py", "--environment", str(out / "environment.json")]
    commands = {"environment": env, "decoding step": decode, "replication": replication, "training step": step,
                "attention": attention, "gpu tests": tests}
    return [(name, seconds * (DRY_RUN_SLACK if dry else 1), commands[name]) for name, seconds in BUDGETS.items()]


def environment(path: Path):
    """Versions found, the packages installed from the carried wheels, and the GPU, as JSON (stage 1, run in a
    fresh process like the others)."""
    import torch

    info = {"python": sys.version.split()[0], "executable": sys.executable, "cuda_available": torch.cuda.is_available()}
    for package in VERSIONS:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    info["torch"] = torch.__version__
    site = os.environ.get("TIDAR_SITE")
    installed = os.environ.get("TIDAR_WHEELS_INSTALLED") == "1" and site
    info["installed_from_wheels"] = ({d.metadata["Name"]: d.version for d in metadata.distributions(path=[site])}
                                     if installed else {})
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, multiprocessors=props.multi_processor_count)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except OSError:
            info["driver"] = None
    path.write_text(json.dumps(info, indent=2) + "\n")
    found = ", ".join(f"{k} {info[k]}" for k in ("python", *VERSIONS) if info.get(k))
    wheels = ", ".join(f"{k} {v}" for k, v in info["installed_from_wheels"].items()) or "nothing"
    print(f"found: {found}\nmissing: {', '.join(k for k in VERSIONS if not info[k]) or 'nothing'}\n"
          f"installed from the carried wheels (into {site}): {wheels}\n"
          f"device: {info.get('gpu', 'no GPU')}{', driver ' + str(info.get('driver')) if info.get('gpu') else ''}")


def _stop(proc: subprocess.Popen):
    """End a stage and everything it started (its own process group): TERM, then KILL after a grace."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(name: str, seconds: int, command: list[str], logs: Path, env: dict) -> dict:
    log = logs / (name.replace(" ", "_") + ".log")
    started = time.time()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(command) + "\n")
        f.flush()
        proc = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=seconds)
            status = "passed" if code == 0 else f"failed (exit code {code})"
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = f"timed out after {seconds}s"
    result = {"status": status, "seconds": round(time.time() - started, 1), "budget": seconds, "log": str(log)}
    if status != "passed":
        result["log_tail"] = log.read_text(errors="replace").splitlines()[-15:]
    print(f"[{name}] {status} in {result['seconds']}s (log {log})", flush=True)
    return result


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def replication_rows(replication: dict) -> list[str]:
    """The replication stage's figures against the paper's targets."""
    runs = replication.get("runs") or {}
    ar, recipe = runs.get("ar"), runs.get("ar+tidar")
    lines = []
    if ar and recipe:
        gap = recipe["ar_perplexity"] / ar["ar_perplexity"] - 1
        lines.append(f"| replication: held-out AR perplexity, recipe vs AR | {recipe['ar_perplexity']:.2f} vs "
                     f"{ar['ar_perplexity']:.2f} ({gap:+.1%}, {'met' if gap <= 0.02 else 'missed'}) | "
                     f"{TARGETS['perplexity']} |")
    elif ar:
        lines.append(f"| replication: held-out AR perplexity, AR | {ar['ar_perplexity']:.2f} (the recipe did not "
                     f"finish) | {TARGETS['perplexity']} |")
    for block, t in ((recipe or {}).get("tidar") or {}).items():
        degenerate = any(((r or {}).get("repetition") or {}).get("degenerate") for r in (t, recipe["ar"]))
        faster = t["speedup_vs_ar"] > 1 and not degenerate
        nfe = ""
        target = TARGETS["speed"]
        if block == "8":
            nfe = f" ({'met' if t['tokens_per_pass'] >= 2.5 and not degenerate else 'missed'})"
            target = f"T/NFE {TARGETS['tokens per pass']}; {target}"
        lines.append(f"| replication: recipe decoding, B={block} | T/NFE {t['tokens_per_pass']:.2f}{nfe}; TiDAR "
                     f"{t['tokens_per_s']:.0f} vs AR {recipe['ar']['tokens_per_s']:.0f} tokens/s "
                     f"({t['speedup_vs_ar']:.2f}x, {'met' if faster else 'missed'}); greedy = AR "
                     f"{t['greedy_identical_fraction']:.0%}; loop fraction / distinct-2 of the output: TiDAR "
                     f"{repetition_text(t.get('repetition'))}, AR {repetition_text(recipe['ar'].get('repetition'))} "
                     f"| {target} |")
    return lines


def _phases(seconds: dict) -> str:
    """{"data": 20.1, "ar": {"train": 61.0, ...}} -> "data 20 s; ar: train 61 s, ..." """
    return "; ".join(f"{k} {v:.0f} s" if not isinstance(v, dict) else
                     f"{k}: " + ", ".join(f"{p} {t:.0f} s" for p, t in v.items()) for k, v in seconds.items())


def summarize(results: dict) -> str:
    """results.md: the figures against their targets, then each stage's status, then the replication table."""
    env = results.get("environment") or {}
    lines = [f"# GPU suite, {results['date']}{' (dry run: toy sizes on the CPU, times meaningless)' if results['dry_run'] else ''}",
             "", f"device: {env.get('gpu', 'CPU')}; torch {env.get('torch')}, triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}, megatron-core {env.get('megatron-core')}; command: "
             f"`{results['command']}`", "", "| figure | measured | target |", "| --- | --- | --- |"]
    for path, row in ((results.get("decoding") or {}).get("paths") or {}).items():
        if "ratio" in row:
            lines.append(f"| decoding pass TiDAR / AR, {path} | {row['ratio']:.2f}x (at 7.45 tokens per pass: "
                         f"{row['implied_speedup_at_paper_tokens_per_pass']:.2f}x AR tokens/s) | "
                         f"{TARGETS['decoding pass TiDAR / AR']} |")
    replication = results.get("replication") or {}
    lines += replication_rows(replication)
    training = (results.get("training") or {}).get("runs", {}).get("none")
    if training:
        lines.append(f"| training step TiDAR / AR | {training['tidar_over_ar']:.2f}x | "
                     f"{TARGETS['training step TiDAR / AR']} |")
        if "mfu" in training["TiDAR"]:
            lines.append(f"| training MFU (TiDAR) | {training['TiDAR']['mfu']:.1%}, peak "
                         f"{training['TiDAR']['peak_memory_gib']:.1f} GiB | {TARGETS['training MFU']} |")
    for row in (results.get("attention") or {}).get("rows", []):
        if row["backend"] == "kernel" and row.get("fwd_bwd_vs_flex") == row.get("fwd_bwd_vs_flex"):  # not NaN
            lines.append(f"| kernel fwd+bwd vs Flex, {row['shape']} L={row['clean_len']} | "
                         f"{row['fwd_bwd_vs_flex']:.2f}x ({row['fwd_bwd_tflops']:.0f} TFLOP/s) | "
                         f"{TARGETS['attention fwd+bwd vs Flex']} |")
    lines += ["", "| stage | status | seconds | budget |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {stage['status']} | {stage['seconds']} | {stage['budget']} |"
              for name, stage in results["stages"].items()]
    if replication.get("table"):
        data, params = replication["data"], replication.get("params", {})
        lines += ["", f"## Replication ({params.get('total', 0) / 1e6:.1f}M parameters, "
                  f"{data['corpus_tokens'] / 1e6:.1f}M corpus tokens from {data['corpus_files']} files, "
                  f"{replication['total_seconds']:.0f} s: {_phases(replication['seconds'])})", "",
                  replication["table"]]
    return "\n".join(lines) + "\n"


BUNDLED = ("*.json", "results.md", "logs/*.log", "replication/*.log", "replication/*.png",
           "replication/*/train.log", "replication/*/*.png", "replication/*-eval/results.md")


def bundle(out: Path, path: Path):
    """The results, logs and plots (not the checkpoints) as one .tar.gz, written under a temporary name."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for pattern in BUNDLED:
            for file in sorted(out.glob(pattern)):
                tar.add(file, arcname=str(file.relative_to(out.parent)))
    tmp.replace(path)


def write(results: dict, out: Path, bundle_path: Path | None):
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(summarize(results))
    if bundle_path:
        bundle(out, bundle_path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="results folder (default runs/gpu_suite-<date>)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--stages", nargs="+", choices=list(BUDGETS), type=lambda name: name.replace("-", " "),
                   metavar="STAGE", help="run only these, in the suite's order (default: all): "
                   + ", ".join(name.replace(" ", "-") for name in BUDGETS))
    p.add_argument("--bundle", help="also write the results, logs and plots as this .tar.gz after every stage")
    p.add_argument("--layers", type=int, default=8, help="layers of the 1p5b shape in the training-step stage")
    p.add_argument("--environment", help=argparse.SUPPRESS)  # stage 1's own entry
    args = p.parse_args(argv)
    if args.environment:
        environment(Path(args.environment))
        return 0
    stamp = datetime.datetime.now(datetime.UTC)
    out = Path(args.out or REPO / "runs" / f"gpu_suite-{stamp:%Y%m%d-%H%M}").resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bundle_path = Path(args.bundle).resolve() if args.bundle else None
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    if args.dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    results = {"date": f"{stamp:%Y-%m-%d %H:%M} UTC", "dry_run": args.dry_run,
               "command": "bash benchmarks/gpu_suite.sh " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "stages": {}}
    chosen = [s for s in stages(out, args.dry_run, args.layers) if not args.stages or s[0] in args.stages]
    print(f"{len(chosen)} stages, {sum(s[1] for s in chosen)} s of budgets; results in {out}", flush=True)
    for name, seconds, command in chosen:
        results["stages"][name] = run_stage(name, seconds, command, logs, env)
        if name in STAGE_RESULTS:
            key, file = STAGE_RESULTS[name]
            results[key] = _load(out / file)
        write(results, out, bundle_path)
    print(f"\n{summarize(results)}\nwrote {out / 'results.json'} and {out / 'results.md'}"
          + (f" and {bundle_path}" if bundle_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
