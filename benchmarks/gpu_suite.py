"""Every figure only a GPU can give, in one short run: `bash benchmarks/gpu_suite.sh [--out DIR] [--dry-run]`.

Stages, each a subprocess with its own time budget (a stage that fails or runs out of time is recorded
and the next one still runs):

  1. environment   GPU, memory, driver, torch, triton, megatron-core, TransformerEngine versions
  2. gpu tests     `pytest -m gpu`: bf16 backend parity, the kernel against SDPA, the fused loss, te
  3. attention     the TiDAR kernel against compiled FlexAttention, SDPA and TE, forward and forward +
                   backward, the 1p5b and 8b head shapes, L = 2048 / 4096 / 8192, block 16
  4. training step TiDAR vs AR of the same model on the same clean tokens at the 1p5b shape (--layers of
                   its 28 layers, to fit the budget), bf16, the kernel backend and the fused loss: step
                   ratio, MFU, peak memory
  5. decoding step one AR pass against one TiDAR pass (16 + 256 queries) at a 4096-token prefix, batch 1,
                   with SDPA, the kernel and torch.compile

Writes DIR/results.json, DIR/results.md (the table against the targets) and DIR/logs/<stage>.log.
`--dry-run` runs every stage at toy sizes on the CPU (kernels in Triton's interpreter) through the same
code and writes the same files; the test suite runs it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"attention fwd+bwd vs Flex": ">= 1.3x", "training step TiDAR / AR": "<= 2.05x (FLOP floor ~2.0x)",
           "training MFU": ">= 45%", "decoding pass TiDAR / AR": "<= 1.4x"}


def stages(out: Path, dry: bool, layers: int) -> list[tuple[str, int, list[str]]]:
    """(name, seconds allowed, command) of each stage; the dry run's are the same programs at toy sizes."""
    py = sys.executable
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
        tests = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"]
    env = [py, "benchmarks/gpu_suite.py", "--environment", str(out / "environment.json")]
    return [("environment", 60, env), ("gpu tests", 120, tests), ("attention", 110, attention),
            ("training step", 100, step), ("decoding step", 60, decode)]


def environment(path: Path):
    """Versions and the GPU, as JSON (stage 1, run in a fresh process like the others)."""
    import importlib.metadata as md

    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    for package in ("triton", "megatron-core", "transformer-engine", "transformers"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = None
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
    print(json.dumps(info, indent=2))


def run_stage(name: str, seconds: int, command: list[str], logs: Path, env: dict) -> dict:
    log = logs / (name.replace(" ", "_") + ".log")
    started = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        try:
            proc = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=seconds)
            status = "passed" if proc.returncode == 0 else f"failed (exit code {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {seconds}s"
    result = {"status": status, "seconds": round(time.time() - started, 1), "log": str(log)}
    print(f"[{name}] {status} in {result['seconds']}s (log {log})", flush=True)
    return result


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(results: dict) -> str:
    """results.md: the figures against their targets, then each stage's status."""
    lines = [f"# GPU suite, {results['date']}{' (dry run: toy sizes on the CPU, times meaningless)' if results['dry_run'] else ''}",
             "", f"device: {results.get('environment', {}).get('gpu', 'CPU')}; "
             f"torch {results.get('environment', {}).get('torch')}; command: `{results['command']}`", "",
             "| figure | measured | target |", "| --- | --- | --- |"]
    attention = results.get("attention") or {}
    for row in attention.get("rows", []):
        if row["backend"] == "kernel" and row.get("fwd_bwd_vs_flex") == row.get("fwd_bwd_vs_flex"):  # not NaN
            lines.append(f"| kernel fwd+bwd vs Flex, {row['shape']} L={row['clean_len']} | "
                         f"{row['fwd_bwd_vs_flex']:.2f}x ({row['fwd_bwd_tflops']:.0f} TFLOP/s) | "
                         f"{TARGETS['attention fwd+bwd vs Flex']} |")
    training = (results.get("training") or {}).get("runs", {}).get("none")
    if training:
        lines.append(f"| training step TiDAR / AR | {training['tidar_over_ar']:.2f}x | "
                     f"{TARGETS['training step TiDAR / AR']} |")
        if "mfu" in training["TiDAR"]:
            lines.append(f"| training MFU (TiDAR) | {training['TiDAR']['mfu']:.1%}, peak "
                         f"{training['TiDAR']['peak_memory_gib']:.1f} GiB | {TARGETS['training MFU']} |")
    for path, row in ((results.get("decoding") or {}).get("paths") or {}).items():
        if "ratio" in row:
            lines.append(f"| decoding pass TiDAR / AR, {path} | {row['ratio']:.2f}x (at 7.45 tokens per pass: "
                         f"{row['implied_speedup_at_paper_tokens_per_pass']:.2f}x AR tokens/s) | "
                         f"{TARGETS['decoding pass TiDAR / AR']} |")
    lines += ["", "| stage | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {name} | {stage['status']} | {stage['seconds']} |" for name, stage in results["stages"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="results folder (default runs/gpu_suite-<date>)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--layers", type=int, default=8, help="layers of the 1p5b shape in the training-step stage")
    p.add_argument("--environment", help=argparse.SUPPRESS)  # stage 1's own entry
    args = p.parse_args(argv)
    if args.environment:
        environment(Path(args.environment))
        return 0
    stamp = datetime.datetime.now(datetime.UTC)
    out = Path(args.out or REPO / "runs" / f"gpu_suite-{stamp:%Y%m%d-%H%M}")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    if args.dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    results = {"date": f"{stamp:%Y-%m-%d %H:%M} UTC", "dry_run": args.dry_run,
               "command": "bash benchmarks/gpu_suite.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
               "stages": {}}
    for name, seconds, command in stages(out, args.dry_run, args.layers):
        results["stages"][name] = run_stage(name, seconds, command, logs, env)
    for key, file in (("environment", "environment.json"), ("attention", "attention.json"),
                      ("training", "training.json"), ("decoding", "decoding.json")):
        results[key] = _load(out / file)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(summarize(results))
    print(f"\n{summarize(results)}\nwrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
