"""`make quickstart`'s pipeline on a reduced budget: tokenizer, data, training with falling loss, checkpoint,
loss curve, export and TiDAR decoding."""

import math
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quickstart_pipeline(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "tidar_megatron.cli", "quickstart", "--out", str(out),
                           "--steps", "30", "--corpus-mb", "1", "--vocab-size", "512", "--seq-length", "32"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "tokenizer.model").is_file() and (out / "data" / "stdlib.idx").is_file()
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "iter_0000030"
    assert (ckpt / "loss.png").stat().st_size > 0
    losses = [float(x) for x in re.findall(r"^step \d+/30 loss ([\d.]+)", (ckpt / "train.log").read_text(), re.M)]
    # Falling: below the first logged value and well below a uniform guess over the vocabulary.
    assert len(losses) == 3 and losses[-1] < losses[0] and losses[-1] < math.log(512) - 1.0, losses
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.model").is_file()
    assert re.search(r"mode=tidar .*T/NFE=[\d.]+", proc.stdout + proc.stderr)
