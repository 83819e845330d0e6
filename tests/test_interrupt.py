"""Ctrl-C on a real `tidar-megatron train` process: the first SIGINT finishes the step, saves and exits
130 with a line instead of tracebacks; the resumed run continues after the saved step; a second SIGINT
aborts at once without publishing a checkpoint.  The first run logs to wandb offline: its record is kept,
and wandb's own console output is one line of ours."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _command(corpus, run_dir, *extra):
    script = Path(sys.executable).with_name("tidar-megatron")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "tidar_megatron"]
    return [*launcher, "train", "--config", "tiny", "--data.blend", corpus["prefix"],
            "--data.tokenizer", corpus["tokenizer"], "--data.split", "90,10,0", "--train.seq_length", "32",
            "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.eval_interval", "0",
            "--train.log_interval", "1", "--train.train_steps", "100000", "--checkpoint.dir", str(run_dir), *extra]


class Run:
    """A training process whose stderr is read line by line."""

    def __init__(self, command, cwd):
        env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # conftest disables wandb for the suite
        env["OMP_NUM_THREADS"] = "1"
        # Its own process group, which Ctrl-C in a terminal signals whole (wandb's service process included).
        self.proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
        self.lines = []

    def ctrl_c(self):
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait_for(self, pattern, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if re.search(pattern, line):
                return re.search(pattern, line)
        self.proc.kill()
        pytest.fail(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout=300):
        rest, _ = self.proc.communicate(timeout=timeout)
        self.lines += rest.splitlines()
        return self.proc.returncode, "\n".join(self.lines)


def test_ctrl_c_saves_and_exits_a_second_ctrl_c_aborts(corpus, tmp_path):
    run_dir = tmp_path / "run"
    first = Run(_command(corpus, run_dir, "--log.wandb_mode", "offline"), cwd=tmp_path)
    first.wait_for(r"^step 3/")
    first.ctrl_c()
    code, output = first.finish()
    assert code == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    saved = int(re.search(r"^interrupted: saved step (\d+) to ", output, re.M).group(1))
    assert saved >= 3 and (run_dir / "latest").read_text().strip() == f"iter_{saved:07d}"
    assert output.count("Ctrl-C: saving after this step, then exiting (Ctrl-C again aborts without saving)") == 1

    # wandb: one line of ours, none of its own, and its record of the run on disk.
    wandb_lines = [line for line in output.splitlines() if line.startswith("wandb")]
    assert len(wandb_lines) == 1, wandb_lines
    where = re.fullmatch(r"wandb: offline run in (\S+); upload it with `wandb sync \1`", wandb_lines[0]).group(1)
    record = next((tmp_path / where).glob("run-*.wandb"))
    assert b"loss_ar" in record.read_bytes() and b"tokens_per_s" in record.read_bytes()

    # Resumed with slower steps (a larger batch), so that the second Ctrl-C lands while work is left.
    second = Run(_command(corpus, run_dir, "--log.wandb_mode", "disabled", "--train.global_batch_size", "64"),
                 cwd=tmp_path)
    second.wait_for(rf"^step {saved + 1}/")
    second.ctrl_c()
    second.wait_for(r"^Ctrl-C: saving after this step")
    second.ctrl_c()
    code, output = second.finish()
    assert code == -signal.SIGINT, output  # ended by the signal's default action, wherever it was
    assert "saved step" not in output and (run_dir / "latest").read_text().strip() == f"iter_{saved:07d}"


def test_every_preset_saves_periodically():
    """What Ctrl-C cannot save (a crash, a kill) costs at most one interval, on every preset."""
    from tidar_megatron.config import load_config, preset_names

    intervals = {name: load_config(name).checkpoint.interval for name in preset_names()}
    assert all(0 < interval <= 1000 for interval in intervals.values()), intervals
