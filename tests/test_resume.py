"""Resuming a run with another config, and checkpoint integrity: real two-run sequences with the tiny preset.

One spawned process trains everything the module needs (a base run, then runs that continue copies of it),
so the module pays for one start-up: extending the run under each schedule rule against a fresh run of the
new length, a checkpoint with flipped bytes, a new run from the base's weights with another block size.
Refusals run in this process and must happen before any process group starts.
"""

import hashlib
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from multirank import run_on_ranks
from test_train import L
from test_train import _args as _train_args

from tidar_megatron.config import load_config
from tidar_megatron.training.resume_check import ResumeMismatch

STEPS = 4


def _args(corpus, run_dir, *extra):
    return _train_args(corpus, run_dir, "--train.lr_warmup_steps", "1", "--train.log_interval", "1",
                       "--checkpoint.interval", "2", "--train.train_steps", str(STEPS), *extra)


def flip_bytes(checkpoint_dir, count=4096):
    """Invert `count` bytes in the middle of the checkpoint's largest file; returns its name."""
    target = max(checkpoint_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    target.write_bytes(bytes(data))
    return target.name


def _train_all(rank, world_size, corpus, root):
    """Every training run of the module, in order, in one process."""
    from tidar_megatron.training import distributed
    from tidar_megatron.training.loop import train

    warnings = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("tidar_megatron.training.checkpoint").addHandler(Collect(logging.WARNING))

    def run(name, *extra, copy_of=None):
        if copy_of:
            shutil.copytree(root / copy_of, root / name)
        try:
            result = train(load_config("tiny", _args(corpus, root / name, *extra)))
        finally:
            distributed.destroy()
        return [(h["step"], h["lr"]) for h in result.get("history", [])]

    runs = {"base": run("base")}
    runs["config"] = run("config", "--train.train_steps", "8", "--checkpoint.lr_schedule", "config", copy_of="base")
    runs["checkpoint"] = run("checkpoint", "--train.train_steps", "8", "--checkpoint.lr_schedule", "checkpoint",
                             copy_of="base")
    runs["fresh8"] = run("fresh8", "--train.train_steps", "8")
    shutil.copytree(root / "base", root / "flipped")
    flipped = flip_bytes(root / "flipped" / f"iter_{STEPS:07d}")
    runs["flipped"] = run("flipped")
    runs["init_from"] = run("init_from", "--checkpoint.init_from", str(root / "base"), "--tidar.draft_block_size", "4",
                            "--train.train_steps", "2")
    return runs, flipped, warnings


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    runs, flipped, warnings = run_on_ranks(1, _train_all, corpus, root)[0]
    return {"root": root, "runs": runs, "flipped": flipped, "warnings": warnings}


def _refusal(corpus, run_dir, *extra) -> str:
    from tidar_megatron.training.loop import train

    with pytest.raises(ResumeMismatch) as caught:
        train(load_config("tiny", _args(corpus, run_dir, *extra)))
    assert not torch.distributed.is_initialized()  # refused before any process group started
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_changed_schedule_is_refused_naming_fields_values_and_options(corpus, trained):
    message = _refusal(corpus, trained["root"] / "base", "--train.train_steps", "200", "--train.min_lr", "1e-4")
    assert "train.train_steps: checkpoint 4, this config 200" in message
    assert "train.min_lr: checkpoint 0.0003, this config 0.0001" in message
    assert ("--checkpoint.lr_schedule checkpoint for the checkpoint's value(s) (Megatron-LM's "
            "--use-checkpoint-opt_param-scheduler) or --checkpoint.lr_schedule config for this config's "
            "(--override-opt_param-scheduler)") in message


def test_the_same_refusal_from_the_command_line_is_one_line(corpus, trained):
    proc = subprocess.run([sys.executable, "-m", "tidar_megatron", "train", "--config", "tiny",
                           *_args(corpus, trained["root"] / "base", "--train.lr_decay_style", "linear")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tidar-megatron train: error: ") and "train.lr_decay_style: checkpoint cosine, " \
        "this config linear" in last
    assert "Traceback" not in proc.stderr


def test_extending_a_run_with_the_config_schedule_follows_a_fresh_run_of_the_new_length(trained):
    runs, log = trained["runs"], (trained["root"] / "config" / "train.log").read_text()
    fresh = dict(runs["fresh8"])
    assert [s for s, _ in runs["config"]] == [5, 6, 7, 8]
    assert [lr for _, lr in runs["config"]] == [fresh[s] for s in (5, 6, 7, 8)]
    min_lr = load_config("tiny").train.min_lr
    assert dict(runs["base"])[4] == min_lr and fresh[5] > 2 * min_lr  # the old schedule had ended
    assert ("learning-rate schedule: this config's (--checkpoint.lr_schedule config): train.train_steps 8 (not 4)"
            in log)


def test_extending_a_run_with_the_checkpoint_schedule_keeps_its_end(trained):
    runs, log = trained["runs"], (trained["root"] / "checkpoint" / "train.log").read_text()
    min_lr = load_config("tiny").train.min_lr
    assert runs["checkpoint"] == [(s, min_lr) for s in (5, 6, 7, 8)]
    assert ("learning-rate schedule: the checkpoint's (--checkpoint.lr_schedule checkpoint): train.train_steps 4 "
            "(not 8)") in log


@pytest.mark.parametrize("field,value,saved", [
    ("tidar.draft_block_size", "4", "8"),
    ("tidar.objective", "ar", "tidar"),
    ("train.seq_length", "48", str(L)),
])
def test_a_resume_that_changes_what_the_checkpoint_means_is_refused(corpus, trained, field, value, saved):
    base = trained["root"] / "base"
    message = _refusal(corpus, base, f"--{field}", value)
    assert f"{field}: checkpoint {saved}, this config {value}" in message
    assert f"--checkpoint.init_from {base}/iter_{STEPS:07d} --checkpoint.dir <new dir>" in message


def test_another_vocabulary_or_mask_token_is_refused(corpus, trained):
    message = _refusal(corpus, trained["root"] / "base", "--model.vocab_size", str(corpus["vocab"] + 1))
    assert f"model.vocab_size: checkpoint {corpus['vocab']}, this config {corpus['vocab'] + 1}" in message
    other = (corpus["mask"] + 1) % corpus["vocab"]
    message = _refusal(corpus, trained["root"] / "base", "--tidar.mask_token_id", str(other))
    assert f"tidar.mask_token_id: checkpoint {corpus['mask']}, this config {other}" in message


def test_the_suggested_init_from_trains_the_new_block_size_from_the_weights(trained):
    root = trained["root"]
    assert [s for s, _ in trained["runs"]["init_from"]] == [1, 2]  # a new run: fresh optimizer and schedule
    assert load_config(root / "init_from" / "config.yaml").tidar.draft_block_size == 4


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_previous(trained):
    """4 KiB inverted inside a tensor file of the newest checkpoint: without checksums it would load."""
    root = trained["root"]
    assert [s for s, _ in trained["runs"]["flipped"]] == [3, 4]  # resumed after step 2
    assert "resumed at step 2" in (root / "flipped" / "train.log").read_text()
    bad = [w for w in trained["warnings"] if "flipped/iter_0000004" in w]
    assert len(bad) == 1 and f"{trained['flipped']} do(es) not match checksums.sha256" in bad[0], trained["warnings"]
    assert "trying the previous checkpoint" in bad[0]


def test_checksums_are_sha256sum_compatible(trained):
    """coreutils' sha256sum reads the manifest as written and agrees with every digest."""
    checkpoint = trained["root"] / "base" / f"iter_{STEPS:07d}"
    if shutil.which("sha256sum"):
        proc = subprocess.run(["sha256sum", "--check", "--strict", "checksums.sha256"], cwd=checkpoint,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = dict(line.split("  ")[::-1] for line in (checkpoint / "checksums.sha256").read_text().splitlines())
    files = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()} - {"checksums.sha256"}
    assert set(listed) == files and "metadata.json" in files
    assert all(hashlib.sha256((checkpoint / f).read_bytes()).hexdigest() == d for f, d in listed.items())


def test_the_run_directory_holds_the_resolved_config_and_the_log_starts_with_the_parameter_count(corpus, trained):
    base = trained["root"] / "base"
    expected = load_config("tiny", _args(corpus, base))
    expected.model.vocab_size, expected.tidar.mask_token_id = corpus["vocab"], corpus["mask"]
    assert load_config(base / "config.yaml").to_dict() == expected.to_dict()
    first = (base / "train.log").read_text().splitlines()[0]
    m = expected.model
    # Two layers of q/k/v/o, SwiGLU MLP and two norms, the final norm, embedding and output layer.
    head_dim = m.hidden_size // m.num_attention_heads
    attention = m.hidden_size * head_dim * (2 * m.num_attention_heads + 2 * m.num_query_groups)
    layer = attention + 3 * m.hidden_size * m.ffn_hidden_size + 2 * m.hidden_size
    total = m.num_layers * layer + m.hidden_size + 2 * expected.padded_vocab_size * m.hidden_size
    assert first == f"config: {base / 'config.yaml'} (resolved); model: {total:,} parameters ({total / 1e6:.2f}M)"
