"""The model with the Triton `kernel` attention backend (run by Triton's CPU interpreter) trains exactly
like the `local` backend: same losses and gradients over a few optimizer steps."""

import pytest
import torch
from gather import full_tensors, name_seeded_init, rel_err
from multirank import run_on_ranks

L, B = 16, 4


def _train(rank, world_size, backend):
    from tidar_megatron.config import load_config
    from tidar_megatron.data.batch import from_token_windows
    from tidar_megatron.layout import TiDARLayout
    from tidar_megatron.training import distributed
    from tidar_megatron.training.trainer import build_trainer

    cfg = load_config("tiny", ["--train.seq_length", str(L), "--tidar.draft_block_size", str(B),
                               "--model.vocab_size", "64", "--model.attention_backend", backend,
                               "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
                               "--parallel.use_distributed_optimizer", "false", "--train.clip_grad", "1e9",
                               "--train.lr", "1e-3", "--train.lr_warmup_steps", "0", "--train.min_lr", "0"])
    distributed.initialize(cfg)
    trainer = build_trainer(cfg, on_gpu=False)
    name_seeded_init(trainer.model)
    layout = TiDARLayout.for_training(L, B)
    g = torch.Generator().manual_seed(0)
    losses, grads = [], []
    for _ in range(2):
        windows = torch.randint(0, 64, (4, L + 1), generator=g)
        micro = [from_token_windows(layout, windows[i:i + 2], cfg.tidar.mask_token_id) for i in (0, 2)]
        m = trainer.train_step(micro)
        losses.append([m["loss"], m["loss_ar"], m["loss_diff"]])
        grads.append(full_tensors(trainer.model, "grad"))
    return losses, grads


@pytest.mark.slow
def test_kernel_backend_trains_like_local():
    local_losses, local_grads = run_on_ranks(1, _train, "local")[0]
    kernel_losses, kernel_grads = run_on_ranks(1, _train, "kernel", env={"TRITON_INTERPRET": "1"})[0]
    torch.testing.assert_close(torch.tensor(kernel_losses), torch.tensor(local_losses), rtol=1e-5, atol=0)
    for step, (got, ref) in enumerate(zip(kernel_grads, local_grads)):
        worst = max((rel_err(got[k], ref[k]), k) for k in ref)
        assert worst[0] <= 1e-4, f"step {step}: gradient of {worst[1]} differs (rel {worst[0]:.2e})"
