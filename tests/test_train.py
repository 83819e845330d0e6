"""The training loop end to end on CPU ranks: exact resume, resharded resume, NaN handling, config
errors, and falling validation loss for both halves.  Preemption (SIGTERM under a real Slurm) is in
test_slurm.py."""

import re
import shutil
import subprocess
import sys

import pytest
import torch
from multirank import run_on_ranks

from tidar_megatron.config import ConfigError, load_config

L = 32


def _args(corpus, ckpt_dir, *extra):
    return ["--model.vocab_size", str(corpus["vocab"]), "--tidar.mask_token_id", str(corpus["mask"]),
            "--data.blend", corpus["prefix"], "--data.tokenizer", corpus["tokenizer"], "--data.split", "90,10,0",
            "--train.seq_length", str(L), "--tidar.draft_block_size", "8", "--train.global_batch_size", "4",
            "--train.micro_batch_size", "2", "--train.eval_interval", "0", "--train.lr_warmup_steps", "2",
            "--checkpoint.dir", str(ckpt_dir), "--log.wandb_mode", "disabled", "--model.num_layers", "2",
            *extra]


def _run_train(rank, world_size, args):
    from tidar_megatron.training.loop import train

    result = train(load_config("tiny", args))
    return [(h["step"], h["loss"], h["loss_ar"], h["loss_diff"]) for h in result.get("history", [])], \
        {k: v for k, v in result.items() if k != "history"}


def _losses(history):
    return {step: loss for step, loss, *_ in history}


@pytest.mark.slow
def test_exact_resume_is_bitwise(corpus, tmp_path):
    N = 3
    full, _ = run_on_ranks(1, _run_train, _args(corpus, tmp_path / "full", "--train.train_steps", str(2 * N)))[0]
    first, info = run_on_ranks(1, _run_train, _args(corpus, tmp_path / "split", "--train.train_steps", str(2 * N),
                                                     "--train.exit_interval", str(N)))[0]
    assert info["stopped_early"] and (tmp_path / "split" / f"iter_{N:07d}").is_dir()
    second, _ = run_on_ranks(1, _run_train, _args(corpus, tmp_path / "split", "--train.train_steps", str(2 * N)))[0]
    assert [s for s, *_ in second] == list(range(N + 1, 2 * N + 1))  # resumed at the next step
    assert _losses(first + second) == _losses(full)  # bitwise equal floats


@pytest.mark.slow
def test_async_saves_capture_their_step_while_training_goes_on(corpus, tmp_path):
    """Two data-parallel ranks save every step in the background.  Each checkpoint must hold the state of
    its own step although training went on while it was written: resuming from step N reproduces the
    uninterrupted run bitwise.  The plain optimizer is the sensitive case (its checkpoint references the
    live Adam state; the distributed optimizer gathers copies).  Every save is published, older pruned."""
    N = 2
    run = tmp_path / "async"
    opt = ["--parallel.use_distributed_optimizer", "false"]
    full, _ = run_on_ranks(2, _run_train, _args(corpus, run, *opt, "--train.train_steps", str(2 * N),
                                                "--checkpoint.interval", "1", "--checkpoint.keep_last", "3",
                                                "--checkpoint.async_save", "true"))[0]
    assert sorted(p.name for p in run.glob("iter_*")) == [f"iter_{s:07d}" for s in range(2, 2 * N + 1)]
    assert (run / "latest").read_text().strip() == f"iter_{2 * N:07d}" and not list(run.glob(".tmp.*"))
    _resume_dir_at(run, tmp_path / "resumed", N)
    second, _ = run_on_ranks(2, _run_train, _args(corpus, tmp_path / "resumed", *opt,
                                                  "--train.train_steps", str(2 * N)))[0]
    assert [s for s, *_ in second] == list(range(N + 1, 2 * N + 1))
    assert _losses(second) == {s: v for s, v in _losses(full).items() if s > N}


@pytest.mark.slow
def test_resharded_resume_tp2_pp2_to_single_rank_and_back(corpus, tmp_path):
    """TP=2/PP=2 trains N+2 steps saving every step (the reference).  TP=1/PP=1 resumes from its step N
    and must reproduce step N+1; TP=2/PP=2 then resumes from that single-rank checkpoint and must
    reproduce step N+2."""
    N = 2
    layout = ["--parallel.tensor_parallel", "2", "--parallel.pipeline_parallel", "2"]
    common = ["--checkpoint.interval", "1", "--checkpoint.keep_last", "10"]
    sharded, _ = run_on_ranks(4, _run_train, _args(corpus, tmp_path / "a", *common, *layout,
                                                   "--train.train_steps", str(N + 2)))[0]
    _resume_dir_at(tmp_path / "a", tmp_path / "b", N)
    single, _ = run_on_ranks(1, _run_train, _args(corpus, tmp_path / "b", *common, "--train.train_steps", str(N + 2),
                                                  "--train.exit_interval", str(N + 1)))[0]
    assert [s for s, *_ in single] == [N + 1]
    torch.testing.assert_close(torch.tensor(single[0][1:]), torch.tensor(sharded[N][1:]), rtol=1e-5, atol=0)
    back, _ = run_on_ranks(4, _run_train, _args(corpus, tmp_path / "b", *common, *layout,
                                                "--train.train_steps", str(N + 2)))[0]
    assert [s for s, *_ in back] == [N + 2]
    torch.testing.assert_close(torch.tensor(back[0][1:]), torch.tensor(sharded[N + 1][1:]), rtol=1e-5, atol=0)
    # The logged parameter count is the whole model's on every layout: TP=2/PP=2 (a), one rank (b's second run).
    counts = [re.findall(r"model: ([\d,]+) parameters", (tmp_path / d / "train.log").read_text()) for d in "ab"]
    assert len(counts[1]) == 3 and counts[0][0] == counts[1][1] == counts[1][2], counts


@pytest.mark.slow
def test_interleaved_pipeline_checkpoint_resumes_on_a_single_rank(corpus, tmp_path):
    """PP=2 x VP=2 (two chunks per rank, saved as model0/model1) trains N+2 steps; one rank resumes from
    its step N and reproduces steps N+1 (the weights) and N+2 (the Adam state of every chunk as well)."""
    N = 2
    common = ["--checkpoint.interval", "1", "--checkpoint.keep_last", "10", "--model.num_layers", "4"]
    interleaved, _ = run_on_ranks(2, _run_train, _args(
        corpus, tmp_path / "a", *common, "--parallel.pipeline_parallel", "2", "--parallel.virtual_pipeline", "2",
        "--train.train_steps", str(N + 2)))[0]
    _resume_dir_at(tmp_path / "a", tmp_path / "b", N)
    single, _ = run_on_ranks(1, _run_train, _args(corpus, tmp_path / "b", *common,
                                                  "--train.train_steps", str(N + 2)))[0]
    assert [s for s, *_ in single] == [N + 1, N + 2]
    torch.testing.assert_close(torch.tensor([h[1:] for h in single]),
                               torch.tensor([h[1:] for h in interleaved[N:]]), rtol=1e-5, atol=0)


def _resume_dir_at(src, dst, step):
    """A copy of checkpoint dir `src` that holds only the checkpoints up to `step`."""
    shutil.copytree(src, dst)
    for path in dst.glob("iter_*"):
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    (dst / "latest").write_text(f"iter_{step:07d}\n")


def _nan_steps(rank, world_size, args):
    """A poisoned token id gives a NaN loss: that step is skipped (no update, no LR step), others train."""
    from tidar_megatron.data.batch import from_token_windows
    from tidar_megatron.layout import TiDARLayout
    from tidar_megatron.training import distributed
    from tidar_megatron.training.trainer import build_trainer

    cfg = load_config("tiny", args)
    distributed.initialize(cfg)
    trainer = build_trainer(cfg, on_gpu=False)
    emb = trainer.model[0].module.embedding.word_embeddings.weight
    poison = 5
    emb.data[poison] = float("nan")
    layout = TiDARLayout.for_training(L, 8)
    clean = torch.randint(10, 50, (4, L + 1))
    bad = clean.clone()
    bad[0, 3] = poison
    results = []
    for windows in (clean, bad, clean):
        before = [p.detach().clone() for p in trainer.model[0].parameters()]
        micro = [from_token_windows(layout, windows[i:i + 2], cfg.tidar.mask_token_id) for i in (0, 2)]
        m = trainer.train_step(micro)
        changed = any(not torch.equal(b, p) for b, p in zip(before, trainer.model[0].parameters())
                      if torch.isfinite(b).all())
        results.append((m["skipped"], changed, trainer.scheduler.num_steps))
    return results


def test_non_finite_step_is_skipped(corpus, tmp_path):
    args = _args(corpus, tmp_path, "--train.train_steps", "10", "--parallel.use_distributed_optimizer", "false",
                 "--train.lr_warmup_steps", "0")
    (skipped1, changed1, n1), (skipped2, changed2, n2), (skipped3, changed3, n3) = run_on_ranks(1, _nan_steps, args)[0]
    assert not skipped1 and changed1
    assert skipped2 and not changed2 and n2 == n1
    assert not skipped3 and changed3 and n3 == n1 + 1


def test_diverging_run_stops_with_a_clear_message(corpus, tmp_path):
    args = _args(corpus, tmp_path, "--train.train_steps", "20", "--train.lr", "1e30", "--train.lr_warmup_steps", "0",
                 "--train.lr_decay_style", "constant", "--train.min_lr", "0", "--train.clip_grad", "0",
                 "--train.max_nan_skips", "2")
    with pytest.raises(AssertionError, match=r"consecutive non-finite steps \(train.max_nan_skips=2\)"):
        run_on_ranks(1, _run_train, args)


@pytest.mark.parametrize("overrides,message", [
    (["--parallel.tensor_parallel", "8"], "num_attention_heads"),
    (["--train.global_batch_size", "6", "--train.micro_batch_size", "4"], "global_batch_size"),
    (["--parallel.pipeline_parallel", "4", "--model.num_layers", "2"], "num_layers"),
    (["--parallel.pipeline_parallel", "2", "--parallel.virtual_pipeline", "2", "--model.num_layers", "6"],
     "num_layers"),
    (["--parallel.pipeline_parallel", "2", "--parallel.virtual_pipeline", "2", "--model.num_layers", "4",
      "--train.global_batch_size", "6", "--train.micro_batch_size", "2"], "multiple of parallel.pipeline_parallel"),
])
def test_impossible_layouts_fail_before_process_groups(overrides, message):
    from tidar_megatron.training.distributed import validate_layout

    cfg = load_config("tiny", overrides)
    with pytest.raises(ConfigError, match=message):
        validate_layout(cfg, world_size=cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)


def test_train_command_reports_config_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tidar_megatron", "train", "--config", "tiny",
                           "--model.attention_backend", "nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, nothing before it
    assert proc.stderr.startswith("tidar-megatron train: error:") and "attention_backend" in proc.stderr


@pytest.mark.slow
def test_training_lowers_validation_loss_of_both_halves(corpus, tmp_path):
    args = _args(corpus, tmp_path, "--train.train_steps", "60", "--train.eval_interval", "10",
                 "--train.eval_iters", "2", "--train.lr", "3e-3")
    _, info = run_on_ranks(1, _run_train, args)[0]
    # The loop records validation after step 10 and the final one after step 60 (info["valid"]).
    first = _first_validation(tmp_path / "train.log")
    assert info["valid"]["loss_ar"] < first["loss_ar"] - 0.3
    assert info["valid"]["loss_diff"] < first["loss_diff"] - 0.3
    # Draft quality from the same forward pass, logged beside the losses and drawn beside the loss curve.
    valid = info["valid"]
    assert len(valid["draft_accuracy"]) == len(valid["draft_agreement"]) == 8  # tidar.draft_block_size
    assert 0 < valid["ar_accuracy"] < 1 and 1 <= valid["est_tokens_per_pass"] <= 8
    assert {"est_tokens_per_pass", "draft_accuracy_mean"} <= set(first)
    assert (tmp_path / "loss.png").stat().st_size > 0


def _first_validation(log_path):
    import json

    for line in log_path.read_text().splitlines():
        if "validation:" in line:
            return json.loads(line.split("validation:", 1)[1])
    raise AssertionError(f"no validation line in {log_path}")


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(corpus, tmp_path):
    """A damaged newest checkpoint is skipped with a warning; the run resumes from the one before."""
    args = _args(corpus, tmp_path, "--checkpoint.interval", "1", "--train.train_steps", "3",
                 "--train.lr_warmup_steps", "0")
    run_on_ranks(1, _run_train, args)
    for shard in (tmp_path / "iter_0000003").glob("*.distcp"):
        shard.write_bytes(b"truncated")
    history, _ = run_on_ranks(1, _run_train, args[:-4] + ["--train.lr_warmup_steps", "0", "--train.train_steps", "4",
                                                         "--checkpoint.lr_schedule", "config"])[0]
    assert [s for s, *_ in history] == [3, 4]  # resumed after step 2: step 3 is trained again
    assert "resumed at step 2" in (tmp_path / "train.log").read_text()


@pytest.mark.slow
def test_document_aware_training_matches_on_tensor_parallel_ranks(corpus, tmp_path):
    """reset_attention_mask / reset_position_ids through the whole loop (per-batch layouts from the EOD
    tokens, validation included): TP=2 reproduces one rank, and the losses differ from packed attention."""
    import json

    from tidar_megatron.data.tokenize_corpus import tokenize_corpus

    # Short documents, so that every 32-token window holds several.
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) for i in range(400)]
    (tmp_path / "short.jsonl").write_text("\n".join(lines) + "\n")
    tokenize_corpus([str(tmp_path / "short.jsonl")], str(tmp_path / "short"), corpus["tokenizer"], workers=1,
                    progress=False)
    short = dict(corpus, prefix=str(tmp_path / "short"))
    common = ["--train.train_steps", "3", "--train.eval_interval", "3", "--train.eval_iters", "1",
              "--parallel.use_distributed_optimizer", "false", "--train.clip_grad", "1e9"]

    def args(name, reset="true", *extra):
        return _args(short, tmp_path / name, *common, "--data.reset_attention_mask", reset,
                     "--data.reset_position_ids", reset, *extra)

    single, info = run_on_ranks(1, _run_train, args("tp1"))[0]
    tp2, _ = run_on_ranks(2, _run_train, args("tp2", "true", "--parallel.tensor_parallel", "2"))[0]
    torch.testing.assert_close(torch.tensor([h[1:] for h in tp2]), torch.tensor([h[1:] for h in single]),
                               rtol=1e-5, atol=0)
    packed, _ = run_on_ranks(1, _run_train, args("packed", "false"))[0]
    assert [h[1] for h in packed] != [h[1] for h in single]
    assert "est_tokens_per_pass" in info["valid"]
