"""Helpers for the tests and benchmarks (not used by the stack itself): a tiny TiDAR trainer for the
decoder's `model.Transformer`, random Hugging Face checkpoints, and writing trained weights back.

Decoding is only interesting on a model whose drafts get accepted; a few hundred CPU steps on a repetitive
corpus give one without the Megatron stack.  The loss is the training stack's (tidar_megatron.training.loss):
(alpha * AR cross-entropy on the clean half + diffusion cross-entropy on the mask blocks) / (1 + alpha),
over `TiDARLayout.for_training`'s doubled sequence.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tidar_megatron.inference.hf_checkpoint import load_hf_model
from tidar_megatron.inference.model import Transformer
from tidar_megatron.layout import TiDARLayout
from tidar_megatron.training import loss


def repetitive_corpus(num_sequences: int, seq_len: int, token_ids: list[int], num_cycles: int = 1,
                      seed: int = 0) -> torch.Tensor:
    """[num_sequences, seq_len] walks around one of `num_cycles` fixed random orderings of `token_ids`.

    With one cycle each token determines the next; with several the model must tell from the context which
    cycle it is on, so drafts are sometimes wrong early in training.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(token_ids)
    cycles = torch.stack([ids[torch.randperm(len(ids), generator=g)] for _ in range(num_cycles)])
    which = torch.randint(0, num_cycles, (num_sequences,), generator=g)
    starts = torch.randint(0, len(ids), (num_sequences,), generator=g)
    steps = (starts[:, None] + torch.arange(seq_len)) % len(ids)
    return cycles[which[:, None], steps]


def toy_tidar_loss(model: Transformer, tokens: torch.Tensor, mask_token_id: int, block_size: int,
                   alpha: float = 1.0) -> torch.Tensor:
    """tokens [b, L + 1] -> the TiDAR loss of the L clean inputs and their mask blocks."""
    clean, labels = tokens[:, :-1], tokens[:, 1:]
    layout = TiDARLayout.for_training(clean.shape[1], block_size)
    inputs = layout.training_inputs(clean, mask_token_id)
    targets, ar_mask, diff_mask = layout.training_targets(clean, labels, torch.ones_like(labels))
    positions = layout.position_ids.to(tokens.device).expand(tokens.shape[0], -1)
    logits = model(inputs, positions, layout.dense_mask(tokens.device)[None])
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    batch = {"ar_mask": ar_mask, "diff_mask": diff_mask}
    return loss.tidar_loss(ce, ar_mask, diff_mask, alpha, loss.TokenCounts.of([batch]))[0]


def train_tidar(model: Transformer, corpus: torch.Tensor, mask_token_id: int, block_size: int, steps: int,
                batch_size: int = 16, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Trains in place with AdamW on random rows of `corpus`; returns the total loss of every step."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        batch = corpus[torch.randint(0, len(corpus), (batch_size,), generator=g)]
        total = toy_tidar_loss(model, batch.to(model.lm_head.weight.device), mask_token_id, block_size)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append(total.item())
    return losses


def tiny_hf_checkpoint(model_dir, model_type: str = "qwen2", seed: int = 0, **config_overrides):
    """Writes a randomly initialised Hugging Face model (built from a config, no download) to `model_dir`.

    Needs `transformers` (a test / benchmark dependency, not one of the decoder).  Returns the config dict.
    """
    import transformers

    config_classes = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                      "llama": transformers.LlamaConfig}
    model_classes = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
                     "llama": transformers.LlamaForCausalLM}
    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    settings.update(config_overrides)
    torch.manual_seed(seed)
    config = config_classes[model_type](**settings)
    model_classes[model_type](config).save_pretrained(model_dir)
    return config.to_dict()


def save_weights(model: Transformer, model_dir: str | Path):
    """Overwrites the safetensors weights of an existing HF directory with `model`'s."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(Path(model_dir) / "model.safetensors"), metadata={"format": "pt"})


def trained_toy_checkpoint(model_dir, corpus: torch.Tensor, steps: int, model_type: str = "qwen2",
                           **config_overrides) -> list[float]:
    """`tiny_hf_checkpoint(model_dir, model_type, **config_overrides)` trained with the TiDAR loss on `corpus`
    (with its tidar_mask_token_id and tidar_draft_block_size) and saved back; returns the step losses."""
    tiny_hf_checkpoint(model_dir, model_type, **config_overrides)
    model, hf = load_hf_model(model_dir)
    losses = train_tidar(model, corpus, hf.tidar_mask_token_id, hf.tidar_draft_block_size, steps)
    save_weights(model, model_dir)
    return losses
