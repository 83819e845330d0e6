"""Parallel parity: TP=2, PP=2 (1F1B, several micro-batches), PP=2 x VP=2 (interleaved 1F1B)
and DP=2 with the distributed optimizer each reproduce the single-rank run's losses, gradients and
updated parameters (fp32, rel <= 1e-5), and its validation metrics (losses, vocab-parallel accuracies,
estimated tokens per pass)."""

import functools

import pytest
import torch
from gather import full_tensors, name_seeded_init, rel_err
from multirank import run_on_ranks

L, B, VOCAB, STEPS, GLOBAL_BATCH = 16, 4, 96, 2, 8
BASE = ["--train.seq_length", str(L), "--tidar.draft_block_size", str(B), "--model.vocab_size", str(VOCAB),
        "--train.global_batch_size", str(GLOBAL_BATCH), "--train.micro_batch_size", "2",
        "--train.lr", "1e-4", "--train.min_lr", "0", "--train.lr_warmup_steps", "0", "--train.lr_decay_style", "constant",
        "--model.num_layers", "4"]


def _windows():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, L + 1), generator=g)


def _train(rank, world_size, overrides, windows):
    from megatron.core import parallel_state as ps

    from tidar_megatron.config import load_config
    from tidar_megatron.data.batch import from_token_windows
    from tidar_megatron.layout import TiDARLayout
    from tidar_megatron.training import distributed
    from tidar_megatron.training.trainer import build_trainer

    cfg = load_config("tiny", BASE + overrides)
    distributed.validate_layout(cfg, world_size)
    distributed.initialize(cfg)
    trainer = build_trainer(cfg, on_gpu=False)
    name_seeded_init(trainer.model)
    layout = TiDARLayout.for_training(L, B)
    dp, dp_rank, mbs = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(), cfg.train.micro_batch_size

    def micro_batches(step_windows):
        mine = step_windows.chunk(dp)[dp_rank]
        return [from_token_windows(layout, mine[i:i + mbs], cfg.tidar.mask_token_id) for i in range(0, len(mine), mbs)]

    valid = trainer.evaluate(micro_batches(windows[0]) + micro_batches(windows[1]))
    losses, grads = [], None
    for step_windows in windows:
        metrics = trainer.train_step(micro_batches(step_windows))
        losses.append([metrics["loss"], metrics["loss_ar"], metrics["loss_diff"], metrics["grad_norm"]])
        if grads is None and not cfg.parallel.use_distributed_optimizer:
            grads = full_tensors(trainer.model, "grad")
    return {"losses": losses, "grads": grads, "params": full_tensors(trainer.model, "param"), "valid": valid}


def _assert_same_validation(got: dict, ref: dict):
    """Losses to rounding; accuracies up to one argmax flipped by rounding (of 2 x 8 x 16 tokens)."""
    assert got.keys() == ref.keys() and {"ar_accuracy", "draft_accuracy", "est_tokens_per_pass"} <= got.keys()
    for key in ("loss", "loss_ar", "loss_diff"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5), key
    for key in ("ar_accuracy", "draft_accuracy", "draft_agreement", "est_tokens_per_pass"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(ref[key]), rtol=0, atol=0.02, msg=key)


def _merge(results, key):
    merged = {}
    for r in results:
        merged.update(r[key] or {})
    return merged


@functools.lru_cache(maxsize=None)
def _reference(distributed_optimizer: bool):
    flag = ["--parallel.use_distributed_optimizer", str(distributed_optimizer).lower()]
    return run_on_ranks(1, _train, flag + ["--train.clip_grad", "1e9"] * (not distributed_optimizer), _windows())[0]


LAYOUTS = {
    "tp2": ["--parallel.tensor_parallel", "2"],
    "pp2": ["--parallel.pipeline_parallel", "2"],
    # Interleaved 1F1B: each rank holds two one-layer chunks (layers 0, 2 and 1, 3).
    "pp2_vp2": ["--parallel.pipeline_parallel", "2", "--parallel.virtual_pipeline", "2"],
    # The memory-lean fused output projection + loss, vocab-parallel, against the unfused single rank.
    "tp2_fused_loss": ["--parallel.tensor_parallel", "2", "--model.fused_loss", "true"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_model_parallel_matches_single_rank(name):
    overrides = LAYOUTS[name] + ["--parallel.use_distributed_optimizer", "false", "--train.clip_grad", "1e9"]
    ref = _reference(False)
    results = run_on_ranks(2, _train, overrides, _windows())
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
        _assert_same_validation(r["valid"], ref["valid"])
    for key in ("grads", "params"):
        got = _merge(results, key)
        assert got.keys() == ref[key].keys()
        worst = max((rel_err(got[k], ref[key][k]), k) for k in got)
        assert worst[0] <= 1e-5, f"{name}: {key} of {worst[1]} differ (rel {worst[0]:.2e})"


@pytest.mark.slow
def test_data_parallel_distributed_optimizer_matches_single_rank():
    """DP=2 with the distributed optimizer and grad clipping active against one rank with the same."""
    ref = _reference(True)
    results = run_on_ranks(2, _train, ["--parallel.use_distributed_optimizer", "true"], _windows())
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
        _assert_same_validation(r["valid"], ref["valid"])
        worst = max((rel_err(r["params"][k], ref["params"][k]), k) for k in ref["params"])
        assert worst[0] <= 1e-5, f"params of {worst[1]} differ (rel {worst[0]:.2e})"
