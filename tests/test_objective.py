"""`tidar.objective: ar`, the AR baseline trained by the same stack: the same model on the same clean tokens
with the causal layout (L tokens, not doubled) and the AR loss only; its loss equals transformers' causal-LM
loss of the exported weights, TP=2 reproduces one rank, and it checkpoints and exports like a TiDAR run."""

import pytest
import torch
import torch.nn.functional as F
from gather import name_seeded_init
from multirank import run_on_ranks

from tidar_megatron.config import load_config

L, VOCAB = 16, 63  # 63 tokens + the mask token fill 64 embedding rows: no padding rows that
# Megatron's softmax would count and the export (which drops them) would not


def _args(*extra):
    return ["--train.seq_length", str(L), "--model.vocab_size", str(VOCAB), "--tidar.objective", "ar",
            "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--model.num_layers", "2",
            "--parallel.use_distributed_optimizer", "false", *extra]


def _loss_and_weights(rank, world_size, out_dir):
    import json

    from safetensors.torch import save_file

    from tidar_megatron.convert.mapping import hf_files, megatron_to_hf
    from tidar_megatron.data.batch import from_token_windows
    from tidar_megatron.layout import TiDARLayout
    from tidar_megatron.training import distributed
    from tidar_megatron.training.trainer import build_trainer

    cfg = load_config("tiny", _args())
    assert cfg.layout == TiDARLayout.causal(L)
    distributed.initialize(cfg)
    trainer = build_trainer(cfg, on_gpu=False)
    name_seeded_init(trainer.model)
    windows = torch.randint(0, VOCAB, (4, L + 1), generator=torch.Generator().manual_seed(0))
    micro = [from_token_windows(cfg.layout, windows[i:i + 2], cfg.tidar.mask_token_id) for i in (0, 2)]
    assert micro[0]["input_ids"].shape == (2, L)  # not doubled
    metrics = trainer.evaluate(micro)
    params = {n: p.detach() for n, p in trainer.model[0].module.named_parameters()}
    save_file(megatron_to_hf(cfg, params), f"{out_dir}/model.safetensors", metadata={"format": "pt"})
    with open(f"{out_dir}/config.json", "w") as f:
        json.dump(hf_files(cfg, torch.float32)[0], f)
    first = trainer.train_step(micro)
    return metrics, windows, first


def test_ar_objective_loss_equals_transformers_causal_lm_loss(tmp_path):
    from transformers import AutoModelForCausalLM

    metrics, windows, first = run_on_ranks(1, _loss_and_weights, str(tmp_path))[0]
    assert set(metrics) >= {"loss", "loss_ar", "ar_accuracy"} and "loss_diff" not in metrics
    assert metrics["loss"] == metrics["loss_ar"]  # L = L_AR: alpha weighs nothing against it
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        logits = reference(windows[:, :L]).logits
    expected = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert first["loss"] == pytest.approx(expected, rel=1e-5) and "loss_diff" not in first


def _run(rank, world_size, args):
    from tidar_megatron.training.loop import train

    result = train(load_config("tiny", args))
    return [h["loss"] for h in result["history"]]


@pytest.mark.slow
def test_ar_objective_trains_on_tensor_parallel_ranks_checkpoints_and_exports(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from tidar_megatron import convert

    common = ["--data.blend", corpus["prefix"], "--data.tokenizer", corpus["tokenizer"], "--data.split", "90,10,0",
              "--train.train_steps", "3", "--train.lr_warmup_steps", "0", "--train.eval_interval", "3",
              "--train.eval_iters", "1", "--log.wandb_mode", "disabled", "--train.clip_grad", "1e9"]
    args = [a for a in _args() if a not in ("--model.vocab_size", str(VOCAB))]  # the tokenizer's vocabulary
    single = run_on_ranks(1, _run, args + common + ["--checkpoint.dir", str(tmp_path / "tp1")])[0]
    tp2 = run_on_ranks(2, _run, args + common + ["--checkpoint.dir", str(tmp_path / "tp2"),
                                                 "--parallel.tensor_parallel", "2"])[0]
    torch.testing.assert_close(torch.tensor(tp2), torch.tensor(single), rtol=1e-5, atol=0)
    assert (tmp_path / "tp1" / "iter_0000003").is_dir() and "validation" in (tmp_path / "tp1" / "train.log").read_text()
    exported = convert.export(tmp_path / "tp2", tmp_path / "hf", tokenizer=corpus["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    assert model.config.vocab_size == corpus["vocab"]
