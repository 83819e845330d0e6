"""The Slurm launchers under a real Slurm (one node, started by slurm/local_cluster.sh; .ci/run does that),
with the tiny preset on 2 CPU tasks: submission, preemption by SIGTERM, resubmission and resume."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0,
    reason="no running Slurm here (start one with: bash slurm/local_cluster.sh up)")


def _submit(script, tmp_path, ckpt, *train_args):
    env = dict(os.environ, PRESET="tiny", CKPT_DIR=str(ckpt), TIDAR_HOME=str(REPO), VENV=sys.prefix,
               OMP_NUM_THREADS="1")
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
         "--mem=0", "--time=15", "--no-requeue", f"--output={tmp_path}/slurm-%j.out", str(REPO / script),
         *train_args], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def _job_state(job):
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\w+)", info)
    code = re.search(r"ExitCode=(\d+):(\d+)", info)
    return (state.group(1) if state else "UNKNOWN"), (code.groups() if code else None)


def _wait(job, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state, code = _job_state(job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state, code
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout}s")


def _train_args(corpus, *extra):
    return ["--model.vocab_size", str(corpus["vocab"]), "--tidar.mask_token_id", str(corpus["mask"]),
            "--data.blend", corpus["prefix"], "--data.tokenizer", corpus["tokenizer"], "--data.split", "90,10,0",
            "--train.seq_length", "32", "--tidar.draft_block_size", "8", "--train.global_batch_size", "4",
            "--train.micro_batch_size", "2", "--train.eval_interval", "0", "--log.wandb_mode", "disabled",
            "--train.lr_warmup_steps", "1",
            *extra]


@pytest.mark.slow
def test_launchers_train_save_on_sigterm_and_resume(corpus, tmp_path):
    """The 1.5B launcher (tiny preset, 2 CPU tasks) is preempted mid-run with `scancel --signal=TERM`: it
    saves and exits 0.  The 8B launcher, submitted on the same checkpoint dir, resumes at the saved step
    and trains to the end, leaving the final checkpoint and the log."""
    ckpt = tmp_path / "ckpt"
    # Background saves every 2 steps: the preemption save must wait for one in flight and for itself.
    args = _train_args(corpus, "--train.log_interval", "1", "--checkpoint.async_save", "true",
                       "--checkpoint.interval", "2")
    job = _submit("slurm/pretrain_1p5b.sh", tmp_path, ckpt, *args, "--train.train_steps", "100000")
    log = ckpt / "train.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "step 2/" in log.read_text()):
        time.sleep(0.5)
    output = tmp_path / f"slurm-{job}.out"
    assert log.exists() and "step 2/" in log.read_text(), output.read_text()
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    state, code = _wait(job)
    assert state == "COMPLETED" and code == ("0", "0"), output.read_text()
    assert "config tiny, 2 tasks" in output.read_text()
    step = int((ckpt / "latest").read_text().strip().split("_")[1])
    assert step >= 2 and f"preempted: saved step {step}" in log.read_text()

    job = _submit("slurm/pretrain_8b.sh", tmp_path, ckpt, *args, "--train.train_steps", str(step + 2),
                  "--checkpoint.lr_schedule", "config")  # a shorter run than the one saved: its own schedule
    state, code = _wait(job)
    assert state == "COMPLETED" and code == ("0", "0"), (tmp_path / f"slurm-{job}.out").read_text()
    text = log.read_text()
    assert f"resumed at step {step}" in text and f"step {step + 2}/{step + 2}" in text
    assert (ckpt / "latest").read_text().strip() == f"iter_{step + 2:07d}"
