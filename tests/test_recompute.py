"""Activation recompute (Megatron-core's `selective` and `full`) leaves the loss and every gradient as they
are, at TP=1 and TP=2, on the local, flex (forward: FlexAttention has no CPU backward) and kernel backends,
and with a non-default layout (the AR objective's causal one): the layout reaches attention as a tensor
argument, which Megatron's checkpointing saves and replays."""

import pytest
import torch
from gather import full_tensors, name_seeded_init
from multirank import run_on_ranks

from tidar_megatron.config import load_config

L, B, VOCAB = 16, 4, 63
MODES = {"none": [], "selective": ["--model.recompute_granularity", "selective"],
         "full": ["--model.recompute_granularity", "full", "--model.recompute_method", "uniform",
                  "--model.recompute_num_layers", "1"],
         "full-block": ["--model.recompute_granularity", "full", "--model.recompute_method", "block",
                        "--model.recompute_num_layers", "1"]}


def _steps(rank, world_size, backend, objective):
    from tidar_megatron.data.batch import from_token_windows
    from tidar_megatron.training import distributed
    from tidar_megatron.training.trainer import build_trainer

    base = ["--train.seq_length", str(L), "--tidar.draft_block_size", str(B), "--model.vocab_size", str(VOCAB),
            "--model.attention_backend", backend, "--tidar.objective", objective, "--model.num_layers", "2",
            "--parallel.tensor_parallel", str(world_size), "--parallel.use_distributed_optimizer", "false",
            "--train.clip_grad", "1e9", "--train.global_batch_size", "4", "--train.micro_batch_size", "2"]
    distributed.initialize(load_config("tiny", base))
    windows = torch.randint(0, VOCAB, (4, L + 1), generator=torch.Generator().manual_seed(0))
    out = {}
    for mode, extra in MODES.items():
        cfg = load_config("tiny", base + extra)
        trainer = build_trainer(cfg, on_gpu=False)
        name_seeded_init(trainer.model)
        micro = [from_token_windows(cfg.layout, windows[i:i + 2], cfg.tidar.mask_token_id) for i in (0, 2)]
        if backend == "flex":  # recompute runs in training mode only: a training-mode forward, no backward
            model = trainer.model[0].module
            model.train()
            with torch.no_grad():
                out[mode] = (model(micro[0]["input_ids"], micro[0]["position_ids"], labels=micro[0]["targets"],
                                   layout=cfg.layout), None)
        else:
            metrics = trainer.train_step(micro)
            out[mode] = ((metrics["loss"], metrics.get("loss_ar"), metrics.get("loss_diff")),
                         full_tensors(trainer.model, "grad"), _saved_by_forward(trainer, micro[0], cfg.layout))
    return out


def _saved_by_forward(trainer, batch, layout) -> int:
    """Bytes of the distinct storages autograd keeps from one training-mode forward: what recompute frees."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model = trainer.model[0].module
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch["input_ids"], batch["position_ids"], labels=batch["targets"], layout=layout)
    return sum(storages.values())


@pytest.mark.slow
@pytest.mark.parametrize("backend,tp,objective", [("local", 1, "tidar"), ("local", 2, "tidar"),
                                                  ("kernel", 1, "tidar"), ("kernel", 2, "ar"),
                                                  ("flex", 1, "tidar")])
def test_recompute_leaves_loss_and_gradients_unchanged(backend, tp, objective):
    results = run_on_ranks(tp, _steps, backend, objective)
    for out in results:
        ref_loss, ref_grads, *ref_saved = out["none"]
        for mode in MODES:
            loss, grads, *saved = out[mode]
            if backend == "flex":  # per-token losses of the forward pass
                assert torch.equal(loss, ref_loss), mode
                continue
            assert loss == ref_loss, mode
            if mode != "none":
                assert saved[0] < ref_saved[0], f"{mode} recompute kept as many activations as none"
            assert grads.keys() == ref_grads.keys()
            for name in grads:
                assert torch.equal(grads[name], ref_grads[name]), f"{mode}: gradient of {name} differs"
